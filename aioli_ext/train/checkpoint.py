"""Atomic writes: a checkpoint or result is either the old file or the new one, never half of one."""
import json
import os
import tempfile

import torch


def _atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates owner-only files; results are meant to be read like any other output.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state, path):
    _atomic(path, lambda stream: torch.save(state, stream))


def load_checkpoint(path):
    # Checkpoints hold tensors, numbers, strings and lists only, so the safe loader reads them.
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json_atomic(data, path):
    _atomic(path, lambda stream: stream.write(json.dumps(data, indent=1).encode()))


def write_text_atomic(text, path):
    _atomic(path, lambda stream: stream.write(text.encode()))
