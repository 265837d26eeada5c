"""Tokenizers for the token-store builders: bytes by default, a local Hugging Face tokenizer on request.

A tokenizer here has ``name`` (recorded in the manifest), ``vocab_size``, ``eos_id`` (the token written after
every document; ``None`` writes no separator), ``encode(text) -> list[int]`` and ``decode(ids) -> str``.
"""
import os

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256 (vocabulary 257).

    Byte tokens need no vocabulary file and no training, so the default corpus is the same on every machine.
    """

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}) for the byte tokenizer, got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        # The end-of-document token has no byte form: show it as a line break between documents.
        data = bytes(int(i) if i != self.eos_id else 10 for i in ids)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face tokenizer that is already on this machine (never downloaded).

    ``name_or_path`` is a ``tokenizer.json`` file (read with the ``tokenizers`` package) or a model folder or
    hub name already in the local cache (read with ``transformers.AutoTokenizer``, ``local_files_only=True``).
    The end-of-document token is the tokenizer's EOS token when it has one.
    """

    def __init__(self, name_or_path: str):
        self.name = str(name_or_path)
        self._encode, self._decode, self.vocab_size, self.eos_id = _load_hf(self.name)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encode(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def spec(self) -> dict:
        return {"kind": "huggingface", "name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}


def _load_hf(name):
    if os.path.isfile(name) and name.endswith(".json"):
        try:
            import tokenizers
        except ImportError as exc:
            raise ImportError(
                f"tokenizer={name!r} is a tokenizer.json file, which needs the 'tokenizers' package "
                f"(pip install tokenizers); the default byte tokenizer needs nothing") from exc
        tok = tokenizers.Tokenizer.from_file(name)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos_id = None
        for candidate in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
            found = tok.token_to_id(candidate)
            if found is not None:
                eos_id = int(found)
                break
        return (lambda text: tok.encode(text, add_special_tokens=False).ids,
                lambda ids: tok.decode(ids), int(vocab_size), eos_id)
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"tokenizer={name!r} needs the 'transformers' package (pip install transformers) or a path to a "
            f"tokenizer.json file with the 'tokenizers' package; the default byte tokenizer needs nothing") from exc
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"tokenizer={name!r} was not found on this machine (only local files and the local cache are "
            f"used, nothing is downloaded): {exc}") from exc
    vocab_size = len(tok)
    eos_id = tok.eos_token_id
    return (lambda text: tok.encode(text, add_special_tokens=False),
            lambda ids: tok.decode(ids), int(vocab_size), None if eos_id is None else int(eos_id))


def load_tokenizer(name=None):
    """Return the byte tokenizer for ``None``/``"bytes"``, else a local Hugging Face tokenizer."""
    if name is None or name == "bytes":
        return ByteTokenizer()
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer must be 'bytes' or the name/path of a local Hugging Face tokenizer, got {name!r}")
    return HFTokenizer(name)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32 (the narrowest type nanoGPT/Megatron readers expect)."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size must be at most 2**32 to fit uint32 tokens, got {vocab_size}")
