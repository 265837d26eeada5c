"""Per-group token stores: the on-disk format, its reader, and importers for nanoGPT and Megatron files.

Format (one directory per corpus)::

    corpus/manifest.json            vocabulary, dtype, groups, per-split sizes and checksums
    corpus/<group>/<split>.bin      tokens, little-endian uint16 (vocab <= 65536) or uint32, documents back
                                    to back, each followed by the end-of-document token when there is one
    corpus/<group>/<split>.idx      int64 document offsets into the .bin: D + 1 entries, 0 first, the token
                                    count last; document d is tokens [idx[d], idx[d + 1])

Training examples are fixed-length windows (see ``TokenWindows``); nothing is copied or re-shuffled when a
corpus is read: every split is memory-mapped once and examples are slices of it.

Imported layouts (the manifest points at the files in place, nothing is copied):

* ``flat``: a raw token file as nanoGPT writes it (``np.memmap`` of uint16, no header, no index). A folder
  with ``train.bin`` and ``val.bin`` (and optionally ``test.bin``) gives the splits directly; a single file
  is split into contiguous token ranges.
* ``megatron``: a Megatron-LM / Megatron-Core ``MMapIndexedDataset`` pair ``prefix.bin`` + ``prefix.idx``
  (index header ``MMIDIDX\\x00\\x00``, version 1, integer token dtypes; the multimodal variant with per-sequence
  modes is not supported). Sequences are read in file order as one token stream; a single prefix is split into
  contiguous ranges at document boundaries.
"""
import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile

import numpy as np
import torch

FORMAT_NAME = "aioli_ext.token_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")

_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_HEADER_BYTES = len(_MEGATRON_MAGIC) + 8 + 1 + 8 + 8
# Megatron's DType codes; 6 and 7 are float types, which cannot hold token ids.
_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_FINGERPRINT_SPAN = 1 << 20
_SCAN_CHUNK = 1 << 24


class CorruptStoreError(ValueError):
    """A token store's files disagree with its manifest or with their own format."""


# ----------------------------------------------------------------------------------------------------- helpers

def sha256_file(path, chunk=1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def quick_fingerprint(path) -> str:
    """sha256 of the file size, its first and its last MiB: cheap enough to check on every open of a large file."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            handle.seek(max(size - _FINGERPRINT_SPAN, _FINGERPRINT_SPAN))
            digest.update(handle.read())
    return digest.hexdigest()


def _canonical_fingerprint(manifest) -> str:
    """sha256 of everything in the manifest but the fingerprint itself: the corpus identity, which also
    catches a hand-edited or truncated manifest."""
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite=False):
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` only on success.

    A failure anywhere leaves no partial corpus behind. ``overwrite`` replaces an existing token store (a
    directory holding a manifest of this format); any other existing path is refused, never deleted.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if os.path.lexists(out_dir):
        if not overwrite:
            raise FileExistsError(f"out_dir {out_dir!r} already exists; pass overwrite=True to replace a token store")
        if not _is_token_store(out_dir):
            raise FileExistsError(
                f"out_dir {out_dir!r} exists and is not a token store (no {MANIFEST} of format {FORMAT_NAME}); "
                f"refusing to replace it")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.lexists(out_dir):
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(trash, "old"))
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def _is_token_store(path):
    try:
        with open(os.path.join(path, MANIFEST)) as handle:
            return json.load(handle).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def write_manifest(directory, manifest):
    manifest = dict(manifest)
    manifest["fingerprint"] = _canonical_fingerprint(manifest)
    path = os.path.join(directory, MANIFEST)
    with open(path + ".part", "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=False)
        handle.write("\n")
    os.replace(path + ".part", path)
    return manifest


def read_megatron_index(idx_path):
    """Parse a Megatron ``.idx``: returns (token dtype, sequence lengths int64, document index int64)."""
    try:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as handle:
            header = handle.read(_MEGATRON_HEADER_BYTES)
    except OSError as exc:
        raise FileNotFoundError(f"Megatron index {idx_path!r} cannot be read: {exc}") from exc
    if len(header) < _MEGATRON_HEADER_BYTES or header[:len(_MEGATRON_MAGIC)] != _MEGATRON_MAGIC:
        raise CorruptStoreError(f"{idx_path!r} is not a Megatron index: it must start with b'MMIDIDX\\x00\\x00'")
    pos = len(_MEGATRON_MAGIC)
    (version,) = struct.unpack("<Q", header[pos:pos + 8])
    (code,) = struct.unpack("<B", header[pos + 8:pos + 9])
    seq_count, doc_count = struct.unpack("<QQ", header[pos + 9:pos + 25])
    if version != 1:
        raise CorruptStoreError(f"{idx_path!r}: Megatron index version must be 1, got {version}")
    if code not in _MEGATRON_DTYPES:
        raise CorruptStoreError(
            f"{idx_path!r}: Megatron dtype code must be an integer type {sorted(_MEGATRON_DTYPES)}, got {code}")
    expected = _MEGATRON_HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if size == expected + seq_count:
        raise CorruptStoreError(f"{idx_path!r} holds per-sequence modes (multimodal Megatron data): not supported")
    if size != expected:
        raise CorruptStoreError(
            f"{idx_path!r}: a Megatron index with {seq_count} sequences and {doc_count} documents must be "
            f"{expected} bytes, the file has {size}")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")  # indexes of huge corpora are not read into memory
    pos = _MEGATRON_HEADER_BYTES
    lengths = raw[pos:pos + 4 * seq_count].view(np.int32).astype(np.int64)
    pos += 4 * seq_count
    pointers = raw[pos:pos + 8 * seq_count].view(np.int64)
    pos += 8 * seq_count
    doc_index = raw[pos:pos + 8 * doc_count].view(np.int64).copy()
    dtype = np.dtype(_MEGATRON_DTYPES[code])
    if lengths.size and lengths.min() < 0:
        raise CorruptStoreError(f"{idx_path!r}: negative sequence length")
    expected_pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize if seq_count else pointers
    if not np.array_equal(pointers, expected_pointers):
        raise CorruptStoreError(
            f"{idx_path!r}: sequences must be stored back to back in the .bin (pointers equal to the running "
            f"sum of lengths); this index has gaps or reorders them")
    if doc_count < 1 or doc_index[0] != 0 or doc_index[-1] != seq_count or np.any(np.diff(doc_index) < 0):
        raise CorruptStoreError(
            f"{idx_path!r}: the document index must start at 0, end at the sequence count {seq_count} and "
            f"never decrease")
    return dtype, lengths, doc_index


# ------------------------------------------------------------------------------------------------------ reader

class TokenStore:
    """A prepared corpus: for each group and split, a memory-mapped token stream and its document offsets.

    ``TokenStore.open(path, groups=None)`` checks every file's size and index against the manifest (cheap);
    ``verify=True`` also checks sha256 checksums and that every token is below ``vocab_size`` (reads everything).
    ``groups`` selects and orders a subset: group ids 0..K-1 follow that order.
    """

    def __init__(self, path, manifest, group_names, verify):
        self.path = path
        self.manifest = manifest
        self.vocab_size = int(manifest["vocab_size"])
        self.dtype = np.dtype(manifest["dtype"])
        self.eos_id = manifest.get("eos_id")
        self.tokenizer_spec = manifest.get("tokenizer", {})
        entries = {g["name"]: g for g in manifest["groups"]}
        self.groups = list(group_names)
        self._entries = [entries[name] for name in self.groups]
        self._tokens = {}
        self._docs = {}
        for entry in self._entries:
            for split, info in entry["splits"].items():
                self._tokens[(entry["name"], split)], self._docs[(entry["name"], split)] = \
                    self._open_split(entry["name"], split, info, verify)

    @classmethod
    def open(cls, path, groups=None, verify=False):
        path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"path {path!r} is not a token store: {MANIFEST} is missing")
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
        except ValueError as exc:
            raise CorruptStoreError(f"{manifest_path!r} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise CorruptStoreError(f"{manifest_path!r}: format must be {FORMAT_NAME!r}")
        if manifest.get("version") != FORMAT_VERSION:
            raise CorruptStoreError(
                f"{manifest_path!r}: version must be {FORMAT_VERSION}, got {manifest.get('version')!r}")
        for key in ("vocab_size", "dtype", "groups"):
            if key not in manifest:
                raise CorruptStoreError(f"{manifest_path!r} lacks the key {key!r}")
        if manifest.get("fingerprint") != _canonical_fingerprint(manifest):
            raise CorruptStoreError(f"{manifest_path!r}: the contents do not match the manifest fingerprint "
                                    f"(edited by hand or damaged)")
        available = [g["name"] for g in manifest["groups"]]
        if groups is None:
            groups = available
        else:
            if isinstance(groups, str):
                groups = [g for g in groups.split(",") if g]
            groups = list(groups)
            unknown = [g for g in groups if g not in available]
            if unknown:
                raise ValueError(f"groups {unknown} are not in the token store {path!r}; it has {available}")
            if len(set(groups)) != len(groups) or not groups:
                raise ValueError(f"groups must be a non-empty list of distinct names, got {groups}")
        return cls(path, manifest, groups, verify)

    def _resolve(self, relative):
        return relative if os.path.isabs(relative) else os.path.join(self.path, relative)

    def _open_split(self, group, split, info, verify):
        where = f"group {group!r} split {split!r}"
        layout = info.get("layout")
        bin_path = self._resolve(info["bin"])
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"{where}: token file {bin_path!r} is missing")
        file_bytes = os.path.getsize(bin_path)
        start, end = int(info["token_start"]), int(info["token_end"])
        if layout == "native":
            dtype = self.dtype
            if file_bytes != int(info["num_tokens"]) * dtype.itemsize:
                raise CorruptStoreError(
                    f"{where}: {bin_path!r} has {file_bytes} bytes but the manifest says {info['num_tokens']} "
                    f"{dtype.name} tokens ({int(info['num_tokens']) * dtype.itemsize} bytes): the file is corrupt")
            idx_path = self._resolve(info["idx"])
            if not os.path.isfile(idx_path):
                raise FileNotFoundError(f"{where}: index file {idx_path!r} is missing")
            idx_bytes = os.path.getsize(idx_path)
            if idx_bytes != (int(info["num_documents"]) + 1) * 8:
                raise CorruptStoreError(
                    f"{where}: {idx_path!r} has {idx_bytes} bytes but {info['num_documents']} documents need "
                    f"{(int(info['num_documents']) + 1) * 8}: the index is corrupt")
            docs = np.fromfile(idx_path, dtype="<i8")
            if docs[0] != 0 or docs[-1] != int(info["num_tokens"]) or np.any(np.diff(docs) < 0):
                raise CorruptStoreError(f"{where}: {idx_path!r} must hold non-decreasing offsets from 0 to "
                                        f"{info['num_tokens']}: the index is corrupt")
            if verify:
                for key, file_path in (("bin_sha256", bin_path), ("idx_sha256", idx_path)):
                    if sha256_file(file_path) != info[key]:
                        raise CorruptStoreError(f"{where}: {file_path!r} does not match its sha256 in the manifest")
            tokens = np.memmap(bin_path, dtype=dtype.newbyteorder("<"), mode="r") if file_bytes else \
                np.zeros(0, dtype=dtype)
        elif layout in ("flat", "megatron"):
            dtype = np.dtype(info["file_dtype"])
            if file_bytes != int(info["file_bytes"]) or quick_fingerprint(bin_path) != info["fingerprint"]:
                raise CorruptStoreError(
                    f"{where}: {bin_path!r} changed since it was imported (size or fingerprint differs)")
            if layout == "megatron":
                _, lengths, doc_index = read_megatron_index(self._resolve(info["idx"]))
                seq_offsets = np.concatenate([[0], np.cumsum(lengths)])
                all_docs = seq_offsets[doc_index]
                docs = all_docs[(all_docs >= start) & (all_docs <= end)] - start
            else:
                docs = np.array([0, end - start], dtype=np.int64)
            tokens = np.memmap(bin_path, dtype=dtype.newbyteorder("<"), mode="r")[start:end]
            if verify:
                _check_token_range(tokens, self.vocab_size, where)
        else:
            raise CorruptStoreError(f"{where}: layout must be 'native', 'flat' or 'megatron', got {layout!r}")
        if verify and layout == "native":
            _check_token_range(tokens, self.vocab_size, where)
        return tokens, docs

    def _group_name(self, group):
        if isinstance(group, (int, np.integer)):
            if not 0 <= group < len(self.groups):
                raise IndexError(f"group must be in [0, {len(self.groups)}), got {group}")
            return self.groups[group]
        if group not in self.groups:
            raise KeyError(f"group {group!r} is not open in this store; open groups: {self.groups}")
        return group

    def tokens(self, group, split) -> np.ndarray:
        """The whole token stream of one group's split (memory-mapped, read-only)."""
        key = (self._group_name(group), split)
        if key not in self._tokens:
            raise KeyError(f"group {key[0]!r} has no split {split!r}; it has "
                           f"{sorted(s for g, s in self._tokens if g == key[0])}")
        return self._tokens[key]

    def document_offsets(self, group, split) -> np.ndarray:
        """int64 [D + 1] offsets of the documents inside ``tokens(group, split)``."""
        self.tokens(group, split)
        return self._docs[(self._group_name(group), split)]

    def num_tokens(self, group, split) -> int:
        return int(self.tokens(group, split).shape[0])

    def windows(self, split, context_length, stride=None) -> "TokenWindows":
        """Fixed-length training/evaluation examples of one split over the open groups (see TokenWindows)."""
        return TokenWindows(self, split, context_length, stride)

    def sizes(self):
        """Per group: tokens and documents per split (the table ``describe`` prints)."""
        rows = []
        for name in self.groups:
            row = {"group": name}
            for split in SPLITS:
                if (name, split) in self._tokens:
                    row[f"{split}_tokens"] = self.num_tokens(name, split)
                    row[f"{split}_documents"] = int(self._docs[(name, split)].shape[0] - 1)
            rows.append(row)
        return rows

    def describe(self) -> str:
        lines = [f"token store {self.path}  vocab {self.vocab_size} ({self.dtype.name})  "
                 f"tokenizer {self.tokenizer_spec.get('kind', '?')}",
                 f"{'group':<12}{'train tokens':>14}{'val tokens':>12}{'test tokens':>12}{'train docs':>12}"
                 f"{'share':>8}"]
        rows = self.sizes()
        total = sum(r.get("train_tokens", 0) for r in rows) or 1
        for r in rows:
            lines.append(f"{r['group']:<12}{r.get('train_tokens', 0):>14,}{r.get('val_tokens', 0):>12,}"
                         f"{r.get('test_tokens', 0):>12,}{r.get('train_documents', 0):>12,}"
                         f"{r.get('train_tokens', 0) / total:>8.1%}")
        return "\n".join(lines)


def _check_token_range(tokens, vocab_size, where):
    for begin in range(0, tokens.shape[0], _SCAN_CHUNK):
        chunk = np.asarray(tokens[begin:begin + _SCAN_CHUNK])
        if chunk.size and (int(chunk.max()) >= vocab_size or int(chunk.min()) < 0):
            raise CorruptStoreError(f"{where}: token ids must be in [0, {vocab_size}), found values in "
                                    f"[{int(chunk.min())}, {int(chunk.max())}]")


# ------------------------------------------------------------------------------------------------------ windows

class TokenWindows:
    """Fixed-length examples of one split, numbered in one global sample-id space for the MixtureSampler.

    Example ``i`` of group ``g`` (0 <= i < num_examples[g]) is the ``context_length + 1`` tokens
    ``tokens[i * stride : i * stride + context_length + 1]`` of that group's split: the first
    ``context_length`` are the inputs, the last ``context_length`` the targets. With the default
    ``stride = context_length`` consecutive examples share exactly one token (the last target of one is the first
    input of the next), so every token is predicted once per epoch. A group's split of N tokens has
    ``num_examples = (N - context_length - 1) // stride + 1`` examples (0 when N <= context_length, which is
    refused). Windows run across document boundaries, which the end-of-document token marks.

    Global sample ids: group g owns [offsets[g], offsets[g + 1]) with offsets = [0, cumsum(num_examples)], in
    the order the store's groups were opened; id s maps to group g = searchsorted(offsets, s, 'right') - 1 and
    example s - offsets[g].
    """

    def __init__(self, store, split, context_length, stride=None):
        if not isinstance(context_length, (int, np.integer)) or context_length < 1:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        stride = context_length if stride is None else stride
        if not isinstance(stride, (int, np.integer)) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        self.store = store
        self.split = split
        self.context_length = int(context_length)
        self.stride = int(stride)
        self.group_names = list(store.groups)
        self._streams = [store.tokens(g, split) for g in self.group_names]
        counts = []
        for name, stream in zip(self.group_names, self._streams):
            n = stream.shape[0]
            if n < context_length + 1:
                raise ValueError(
                    f"group {name!r} split {split!r} has {n} tokens, fewer than context_length + 1 = "
                    f"{context_length + 1}: it holds no example; use a shorter context or more data")
            counts.append((n - context_length - 1) // self.stride + 1)
        self.num_examples = np.asarray(counts, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self.num_examples)]).astype(np.int64)
        self.offsets = torch.from_numpy(self._offsets.copy())

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def example(self, group: int, index: int) -> np.ndarray:
        """Example ``index`` of group ``group``: int64 [context_length + 1]."""
        if not 0 <= group < self.num_groups:
            raise IndexError(f"group must be in [0, {self.num_groups}), got {group}")
        if not 0 <= index < self.num_examples[group]:
            raise IndexError(f"index must be in [0, {int(self.num_examples[group])}) for group "
                             f"{self.group_names[group]!r}, got {index}")
        start = index * self.stride
        return np.asarray(self._streams[group][start:start + self.context_length + 1], dtype=np.int64)

    def locate(self, sample_ids):
        """Global ids -> (group ids, example index inside the group), both int64 arrays of the same shape."""
        ids = np.asarray(sample_ids.cpu() if torch.is_tensor(sample_ids) else sample_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids must be in [0, {len(self)}), got values in [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        groups = np.searchsorted(self._offsets, ids, side="right") - 1
        return groups, ids - self._offsets[groups]

    def gather(self, sample_ids) -> tuple:
        """Global ids [B] -> (tokens int64 [B, context_length + 1], group ids int64 [B])."""
        groups, local = self.locate(sample_ids)
        groups, local = groups.reshape(-1), local.reshape(-1)
        out = np.empty((groups.shape[0], self.context_length + 1), dtype=np.int64)
        span = np.arange(self.context_length + 1, dtype=np.int64)
        for g in np.unique(groups):
            rows = np.nonzero(groups == g)[0]
            out[rows] = self._streams[g][(local[rows] * self.stride)[:, None] + span]
        return torch.from_numpy(out), torch.from_numpy(groups.astype(np.int64))

    def batch(self, sample_ids):
        """Global ids [B] -> (inputs [B, T], targets [B, T], group ids [B]), all int64."""
        tokens, groups = self.gather(sample_ids)
        return tokens[:, :-1], tokens[:, 1:], groups

    def evaluation_ids(self, max_per_group=None):
        """Per group, global ids of a fixed evaluation subset: all examples, or ``max_per_group`` evenly spaced.

        The same ids every call, so differences between evaluations are not sampling noise.
        """
        out = []
        for g in range(self.num_groups):
            n = int(self.num_examples[g])
            if max_per_group is None or max_per_group >= n:
                local = np.arange(n, dtype=np.int64)
            else:
                if max_per_group < 1:
                    raise ValueError(f"max_per_group must be positive, got {max_per_group}")
                local = (np.arange(max_per_group, dtype=np.int64) * n) // max_per_group
            out.append(torch.from_numpy(local + self._offsets[g]))
        return out


# ---------------------------------------------------------------------------------------------------- importers

def import_token_files(out_dir, groups, vocab_size, layout="flat", dtype=None, val_fraction=0.05,
                       test_fraction=0.05, overwrite=False, check_tokens=True):
    """Make a token store over existing nanoGPT (``layout="flat"``) or Megatron (``"megatron"``) token files.

    ``groups`` maps a group name to either a mapping ``{"train": path, "val": path[, "test": path]}`` (for
    Megatron, paths are prefixes without .bin/.idx), a nanoGPT data folder holding ``train.bin`` and ``val.bin``
    (and ``test.bin`` when present), or one file/prefix, split into contiguous token ranges: train first, then
    ``val_fraction``, then ``test_fraction`` of the tokens (Megatron: rounded to document boundaries).
    Flat files hold ``dtype`` tokens (default uint16, as nanoGPT writes them). Only a manifest is written:
    the token files are used in place. ``check_tokens`` scans every token once for ids >= ``vocab_size``.
    """
    if layout not in ("flat", "megatron"):
        raise ValueError(f"layout must be 'flat' or 'megatron', got {layout!r}")
    if not isinstance(groups, dict) or not groups:
        raise ValueError("groups must be a non-empty dict of group name -> files")
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    _check_fractions(val_fraction, test_fraction)
    flat_dtype = np.dtype(dtype or np.uint16)
    entries = []
    for name, spec in groups.items():
        _check_group_name(name)
        explicit = _explicit_splits(name, spec, layout)
        splits = {}
        if explicit is not None:
            for split, source in explicit.items():
                info = _import_source(name, split, source, layout, flat_dtype, vocab_size, check_tokens)
                splits[split] = info
        else:
            whole = _import_source(name, "all", spec, layout, flat_dtype, vocab_size, check_tokens)
            for split, (start, end) in _contiguous_ranges(name, spec, layout, whole, val_fraction,
                                                          test_fraction).items():
                splits[split] = dict(whole, token_start=start, token_end=end, num_tokens=end - start)
        entries.append({"name": name, "source": {"layout": layout, "spec": _jsonable(spec)}, "splits": splits})
    with atomic_directory(out_dir, overwrite) as tmp:
        write_manifest(tmp, {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": int(vocab_size),
            "dtype": np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32).name,
            "eos_id": None, "tokenizer": {"kind": "external", "vocab_size": int(vocab_size)},
            "split_rule": {"method": "files" if all(_explicit_splits(n, s, layout) is not None
                                                    for n, s in groups.items()) else "contiguous",
                           "val_fraction": val_fraction, "test_fraction": test_fraction},
            "groups": entries})
    return TokenStore.open(out_dir)


def _jsonable(spec):
    if isinstance(spec, dict):
        return {k: os.path.abspath(os.fspath(v)) for k, v in spec.items()}
    return os.path.abspath(os.fspath(spec))


def _check_group_name(name):
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name \
            or "," in name:
        raise ValueError(f"group name must be a non-empty string without '/', '\\\\', ',' or a leading '.', "
                         f"got {name!r}")


def _check_fractions(val_fraction, test_fraction):
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"{label} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")


def _explicit_splits(name, spec, layout):
    if isinstance(spec, dict):
        unknown = set(spec) - set(SPLITS)
        if unknown or "train" not in spec or "val" not in spec:
            raise ValueError(f"group {name!r}: a split mapping needs 'train' and 'val' (and optionally 'test'), "
                             f"got keys {sorted(spec)}")
        return dict(spec)
    spec = os.fspath(spec)
    if layout == "flat" and os.path.isdir(spec):
        found = {s: os.path.join(spec, f"{s}.bin") for s in SPLITS if os.path.isfile(os.path.join(spec, f"{s}.bin"))}
        if "train" not in found or "val" not in found:
            raise FileNotFoundError(f"group {name!r}: folder {spec!r} must hold train.bin and val.bin "
                                    f"(nanoGPT layout)")
        return found
    return None


def _import_source(name, split, source, layout, flat_dtype, vocab_size, check_tokens):
    where = f"group {name!r} split {split!r}"
    source = os.path.abspath(os.fspath(source))
    if layout == "flat":
        bin_path = source
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"{where}: token file {bin_path!r} does not exist")
        size = os.path.getsize(bin_path)
        if size % flat_dtype.itemsize:
            raise CorruptStoreError(f"{where}: {bin_path!r} has {size} bytes, not a multiple of the "
                                    f"{flat_dtype.name} token size {flat_dtype.itemsize}: wrong dtype or truncated")
        file_dtype, num_tokens, idx_path, num_docs = flat_dtype, size // flat_dtype.itemsize, None, 1
    else:
        bin_path, idx_path = source + ".bin", source + ".idx"
        if not os.path.isfile(bin_path) or not os.path.isfile(idx_path):
            raise FileNotFoundError(f"{where}: Megatron prefix {source!r} needs both {bin_path!r} and {idx_path!r}")
        file_dtype, lengths, doc_index = read_megatron_index(idx_path)
        num_tokens = int(lengths.sum())
        size = os.path.getsize(bin_path)
        if size != num_tokens * file_dtype.itemsize:
            raise CorruptStoreError(f"{where}: {bin_path!r} has {size} bytes but its index describes "
                                    f"{num_tokens} {file_dtype.name} tokens: the pair is corrupt or mismatched")
        num_docs = int(doc_index.shape[0] - 1)
    if num_tokens == 0:
        raise ValueError(f"{where}: {bin_path!r} holds no tokens")
    if check_tokens:
        _check_token_range(np.memmap(bin_path, dtype=file_dtype.newbyteorder("<"), mode="r"), vocab_size, where)
    return {"layout": layout, "bin": bin_path, "idx": idx_path, "file_dtype": file_dtype.name,
            "file_bytes": size, "fingerprint": quick_fingerprint(bin_path), "token_start": 0,
            "token_end": num_tokens, "num_tokens": num_tokens, "num_documents": num_docs}


def _contiguous_ranges(name, spec, layout, whole, val_fraction, test_fraction):
    total = whole["num_tokens"]
    cut_val = int(round(total * (1.0 - val_fraction - test_fraction)))
    cut_test = int(round(total * (1.0 - test_fraction)))
    if layout == "megatron":
        _, lengths, doc_index = read_megatron_index(whole["idx"])
        bounds = np.concatenate([[0], np.cumsum(lengths)])[doc_index]
        cut_val = int(bounds[np.argmin(np.abs(bounds - cut_val))])
        cut_test = int(bounds[np.argmin(np.abs(bounds - cut_test))])
    ranges = {"train": (0, cut_val), "val": (cut_val, cut_test), "test": (cut_test, total)}
    for split, (start, end) in ranges.items():
        if end <= start:
            raise ValueError(f"group {name!r}: {spec!r} is too small (or has too few documents) to give a "
                             f"non-empty {split!r} split with val_fraction={val_fraction}, "
                             f"test_fraction={test_fraction}")
    return ranges
