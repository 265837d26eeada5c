"""Builders that write token stores: from folders of .txt/.jsonl files, and the shared writer they use.

Splits are by document and by hash: a document goes to val when u < val_fraction, to test when
u < val_fraction + test_fraction, else to train, where u is the first 8 bytes of
sha256(salt + "\\0" + document text) read as a fraction of 2**64. The rule needs no shuffled copy, gives the
same split on every machine and in every run, keeps exact duplicates in one split, and does not depend on the
group, so a document that appears in two groups lands in the same split in both.
"""
import hashlib
import json
import os

import numpy as np

from .store import (FORMAT_NAME, FORMAT_VERSION, SPLITS, TokenStore, _check_fractions, _check_group_name,
                    atomic_directory, write_manifest)
from .tokenizers import load_tokenizer, token_dtype

DEFAULT_SALT = "aioli_ext-split-v1"


def split_of(text: str, val_fraction: float, test_fraction: float, salt: str = DEFAULT_SALT) -> str:
    """The split ("train", "val" or "test") the hash rule assigns to one document."""
    digest = hashlib.sha256(salt.encode("utf-8") + b"\0" + text.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def chunk_text(text: str, max_chars):
    """Cut a document into pieces of at most ``max_chars`` characters at line ends (hard cuts only inside a
    longer line). Long documents otherwise make hash splits of small groups very uneven."""
    if max_chars is None or len(text) <= max_chars:
        return [text] if text else []
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if current:
                pieces.append("".join(current))
                current, size = [], 0
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if size + len(line) > max_chars and current:
            pieces.append("".join(current))
            current, size = [], 0
        if line:
            current.append(line)
            size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


def write_token_store(out_dir, group_documents, tokenizer=None, val_fraction=0.05, test_fraction=0.05,
                      salt=DEFAULT_SALT, max_document_chars=None, overwrite=False, extra=None):
    """Tokenise and write a token store; nothing appears at ``out_dir`` unless every group succeeds.

    ``group_documents``: ordered mapping group name -> (iterable of document texts, source description dict).
    Every group must end up with at least one document in each split.
    """
    _check_fractions(val_fraction, test_fraction)
    if max_document_chars is not None and (not isinstance(max_document_chars, int) or max_document_chars < 1):
        raise ValueError(f"max_document_chars must be a positive integer or None, got {max_document_chars!r}")
    if not group_documents:
        raise ValueError("group_documents must name at least one group")
    tok = load_tokenizer(tokenizer) if tokenizer is None or isinstance(tokenizer, str) else tokenizer
    dtype = token_dtype(tok.vocab_size)
    entries = []
    with atomic_directory(out_dir, overwrite) as tmp:
        for name, (documents, source) in group_documents.items():
            _check_group_name(name)
            entries.append(_write_group(tmp, name, documents, source, tok, dtype, val_fraction, test_fraction,
                                        salt, max_document_chars))
        manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": int(tok.vocab_size),
                    "dtype": dtype.name, "eos_id": tok.eos_id, "tokenizer": tok.spec(),
                    "split_rule": {"method": "sha256-of-document", "salt": salt, "val_fraction": val_fraction,
                                   "test_fraction": test_fraction, "max_document_chars": max_document_chars},
                    "groups": entries}
        if extra:
            manifest.update(extra)
        write_manifest(tmp, manifest)
    return TokenStore.open(out_dir)


def _write_group(root, name, documents, source, tok, dtype, val_fraction, test_fraction, salt, max_chars):
    os.makedirs(os.path.join(root, name))
    handles = {s: open(os.path.join(root, name, f"{s}.bin"), "wb") for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}
    offsets = {s: [0] for s in SPLITS}
    chars = {s: 0 for s in SPLITS}
    eos = [] if tok.eos_id is None else [tok.eos_id]
    try:
        for text in documents:
            for piece in chunk_text(text, max_chars):
                split = split_of(piece, val_fraction, test_fraction, salt)
                ids = np.concatenate([tok.encode(piece), np.asarray(eos, dtype=np.int64)])
                if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
                    raise ValueError(f"group {name!r}: the tokenizer produced ids outside [0, {tok.vocab_size})")
                data = ids.astype(dtype.newbyteorder("<")).tobytes()
                handles[split].write(data)
                digests[split].update(data)
                offsets[split].append(offsets[split][-1] + int(ids.size))
                chars[split] += len(piece)
    finally:
        for handle in handles.values():
            handle.close()
    splits = {}
    for split in SPLITS:
        if len(offsets[split]) == 1:
            total = sum(len(o) - 1 for o in offsets.values())
            raise ValueError(
                f"group {name!r} has no document in the {split!r} split ({total} documents in all): add "
                f"documents, cut them smaller (max_document_chars) or raise val_fraction/test_fraction")
        idx = np.asarray(offsets[split], dtype="<i8")
        idx_path = os.path.join(root, name, f"{split}.idx")
        idx.tofile(idx_path)
        splits[split] = {"layout": "native", "bin": f"{name}/{split}.bin", "idx": f"{name}/{split}.idx",
                         "token_start": 0, "token_end": int(idx[-1]), "num_tokens": int(idx[-1]),
                         "num_documents": int(idx.shape[0] - 1), "num_chars": chars[split],
                         "bin_sha256": digests[split].hexdigest(),
                         "idx_sha256": hashlib.sha256(idx.tobytes()).hexdigest()}
    return {"name": name, "source": source, "splits": splits}


# ------------------------------------------------------------------------------------------------ from folders

def folder_documents(folder, text_key="text"):
    """Documents of one group folder, in sorted path order: each .txt file is one document, each line of a
    .jsonl file one document (its ``text_key`` field). Other files are ignored and counted."""
    folder = os.fspath(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for filename in sorted(filenames):
            files.append(os.path.join(dirpath, filename))
    files.sort(key=lambda p: os.path.relpath(p, folder))
    usable = [p for p in files if p.endswith((".txt", ".jsonl"))]
    return usable, len(files) - len(usable)


def _iter_folder(name, usable, text_key):
    for path in usable:
        if path.endswith(".txt"):
            with open(path, "rb") as handle:
                text = handle.read().decode("utf-8", errors="replace")
            if text:
                yield text
            continue
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    raise ValueError(f"group {name!r}: {path}:{line_no} is not valid JSON ({exc})") from exc
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"group {name!r}: {path}:{line_no} must be a JSON object with a string "
                                     f"field {text_key!r}")
                if record[text_key]:
                    yield record[text_key]


def build_from_folders(out_dir, groups, tokenizer=None, val_fraction=0.05, test_fraction=0.05,
                       text_key="text", max_document_chars=None, salt=DEFAULT_SALT, overwrite=False):
    """Build a token store with one group per folder of .txt/.jsonl files.

    ``groups``: a mapping group name -> folder, or a list of folders (each named after its folder).
    A missing folder, or one without any .txt/.jsonl document, is an error before anything is written.
    """
    if isinstance(groups, (list, tuple)):
        named = {}
        for folder in groups:
            name = os.path.basename(os.path.normpath(os.fspath(folder)))
            if name in named:
                raise ValueError(f"groups: two folders are named {name!r}; pass a dict to name them")
            named[name] = folder
        groups = named
    if not isinstance(groups, dict) or not groups:
        raise ValueError("groups must be a non-empty dict of name -> folder or a list of folders")
    plan = {}
    for name, folder in groups.items():
        _check_group_name(name)
        folder = os.path.abspath(os.fspath(folder))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"group {name!r}: folder {folder!r} does not exist")
        usable, ignored = folder_documents(folder, text_key)
        if not any(os.path.getsize(p) for p in usable):
            raise ValueError(f"group {name!r}: folder {folder!r} holds no non-empty .txt or .jsonl file")
        plan[name] = (_iter_folder(name, usable, text_key),
                      {"kind": "folder", "folder": folder, "files": len(usable), "ignored_files": ignored,
                       "bytes": sum(os.path.getsize(p) for p in usable)})
    return write_token_store(out_dir, plan, tokenizer, val_fraction, test_fraction, salt, max_document_chars,
                             overwrite)
