"""Token stores: builders, splits, windows, importers and every way a bad input must fail cleanly."""
import hashlib
import json
import os
import struct

import numpy as np
import pytest
import torch

from aioli_ext.data import (DEFAULT_GROUPS, ByteTokenizer, CorruptStoreError, TokenStore, build_default_corpus,
                            build_from_folders, chunk_text, import_token_files, load_tokenizer, split_of, token_dtype)
from aioli_ext.data.default_corpus import collect_group

SPLITS = ("train", "val", "test")


def _build(out, groups, **kwargs):
    # Wide splits by default so that a hundred test documents surely fill every split.
    return build_from_folders(out, groups, **{"val_fraction": 0.15, "test_fraction": 0.15, **kwargs})


def _documents(prefix, count, seed):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζῆτα", "eta", "theta", "\n", "  ", "{}", "λ"]
    return [f"{prefix} {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 60))))
            for i in range(count)]


def _write_folder(root, name, docs, jsonl_every=3):
    folder = os.path.join(root, name)
    os.makedirs(os.path.join(folder, "sub"))
    lines = []
    for i, doc in enumerate(docs):
        if i % jsonl_every == 0:
            lines.append(json.dumps({"text": doc, "meta": i}))
        else:
            with open(os.path.join(folder, "sub" if i % 2 else "", f"doc{i:04d}.txt"), "w", encoding="utf-8") as f:
                f.write(doc)
    with open(os.path.join(folder, "part.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")
    with open(os.path.join(folder, "ignored.csv"), "w") as f:
        f.write("not,a,document\n")
    return folder


@pytest.fixture
def two_groups(tmp_path):
    docs = {"prose": _documents("prose", 120, 0), "code": _documents("code", 90, 1)}
    folders = {name: _write_folder(str(tmp_path / "src"), name, d) for name, d in docs.items()}
    return docs, folders


def _decode_split(store, group, split):
    tok = ByteTokenizer()
    tokens = np.asarray(store.tokens(group, split))
    offsets = store.document_offsets(group, split)
    out = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        assert tokens[b - 1] == tok.eos_id  # every document ends with the end-of-document token
        out.append(bytes(tokens[a:b - 1].astype(np.uint8)).decode("utf-8"))
    return out


def _leftovers(parent):
    return sorted(p for p in os.listdir(parent) if p.startswith("."))


# ---------------------------------------------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "plain ascii, ünïcödé, 中文, emoji 🙂 and \x00 nul"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256
    with pytest.raises(ValueError, match=r"ids must be in \[0, 257\)"):
        tok.decode([300])


def test_token_dtype_by_vocabulary():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        token_dtype(0)


def test_missing_hf_tokenizer_is_a_clear_error():
    with pytest.raises((ImportError, ValueError), match="tokenizer='no-such-tokenizer-for-tests'"):
        load_tokenizer("no-such-tokenizer-for-tests")


# ----------------------------------------------------------------------------------------------------- builders

def test_folder_build_round_trips_every_document_into_exactly_one_split(tmp_path, two_groups):
    docs, folders = two_groups
    store = _build(tmp_path / "store", folders, val_fraction=0.15, test_fraction=0.15)
    assert store.groups == ["prose", "code"]
    assert store.dtype == np.uint16 and store.vocab_size == 257
    for name, expected in docs.items():
        found = {split: _decode_split(store, name, split) for split in SPLITS}
        assert sorted(sum(found.values(), [])) == sorted(expected)
        for split, texts in found.items():
            assert texts, f"{name} {split} is empty"
            assert all(split_of(t, 0.15, 0.15) == split for t in texts)
        # disjoint splits: no document text in two of them
        assert not (set(found["train"]) & set(found["val"]) or set(found["train"]) & set(found["test"])
                    or set(found["val"]) & set(found["test"]))
    source = store.manifest["groups"][0]["source"]
    assert source["files"] > 0 and source["ignored_files"] == 1


def test_builds_are_deterministic(tmp_path, two_groups):
    _, folders = two_groups
    a = _build(tmp_path / "a", folders)
    b = _build(tmp_path / "b", folders)
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    for group in a.groups:
        for split in SPLITS:
            for ext in ("bin", "idx"):
                with open(tmp_path / "a" / group / f"{split}.{ext}", "rb") as fa, \
                        open(tmp_path / "b" / group / f"{split}.{ext}", "rb") as fb:
                    assert fa.read() == fb.read()


def test_hash_split_fractions_and_duplicates():
    docs = [f"document number {i}" for i in range(20000)]
    counts = {s: 0 for s in SPLITS}
    for d in docs:
        counts[split_of(d, 0.1, 0.05)] += 1
    # Binomial standard deviations: val sqrt(20000 * 0.1 * 0.9) = 42, test 31; allow 5 of them.
    assert abs(counts["val"] - 2000) < 5 * 42
    assert abs(counts["test"] - 1000) < 5 * 31
    assert split_of("same text", 0.3, 0.3) == split_of("same text", 0.3, 0.3)
    assert split_of("same text", 0.3, 0.3, salt="a") in SPLITS


def test_chunk_text_cuts_at_line_ends_and_keeps_everything():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(200)) + "x" * 250
    pieces = chunk_text(text, 100)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-4])  # only the 250-char tail needs hard cuts
    assert chunk_text("", 10) == [] and chunk_text("short", None) == ["short"]


def test_missing_group_folder_is_an_error_and_writes_nothing(tmp_path, two_groups):
    _, folders = two_groups
    folders = dict(folders, ghost=str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="group 'ghost': folder .* does not exist"):
        _build(tmp_path / "out", folders)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_empty_group_folder_is_an_error_and_writes_nothing(tmp_path, two_groups):
    _, folders = two_groups
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="group 'empty': folder .* holds no non-empty .txt or .jsonl file"):
        _build(tmp_path / "out", dict(folders, empty=str(empty)))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_failure_in_a_late_group_leaves_no_partial_store(tmp_path, two_groups):
    _, folders = two_groups
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "one.txt").write_text("a single document cannot fill three splits")
    with pytest.raises(ValueError, match="group 'tiny' has no document in the '(val|test|train)' split"):
        _build(tmp_path / "out", dict(folders, tiny=str(tiny)))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_bad_jsonl_line_names_file_and_line(tmp_path, two_groups):
    _, folders = two_groups
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2 is not valid JSON"):
        _build(tmp_path / "out", dict(folders, bad=str(bad)))
    (bad / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1 must be a JSON object with a string field 'text'"):
        _build(tmp_path / "out", dict(folders, bad=str(bad)))
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_output_is_refused_or_replaced_safely(tmp_path, two_groups):
    _, folders = two_groups
    _build(tmp_path / "store", folders)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        _build(tmp_path / "store", folders)
    replaced = _build(tmp_path / "store", {"prose": folders["prose"]}, overwrite=True)
    assert replaced.groups == ["prose"] and _leftovers(tmp_path) == []
    user_dir = tmp_path / "precious"
    user_dir.mkdir()
    (user_dir / "keep.txt").write_text("not a token store")
    with pytest.raises(FileExistsError, match="is not a token store .* refusing to replace it"):
        _build(user_dir, folders, overwrite=True)
    assert (user_dir / "keep.txt").read_text() == "not a token store"


def test_bad_group_names_and_fractions(tmp_path, two_groups):
    _, folders = two_groups
    with pytest.raises(ValueError, match="group name must be a non-empty string"):
        _build(tmp_path / "o", {"a/b": folders["prose"]})
    with pytest.raises(ValueError, match="val_fraction must be in"):
        _build(tmp_path / "o", folders, val_fraction=0.0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be below 1"):
        _build(tmp_path / "o", folders, val_fraction=0.5, test_fraction=0.5)


# ------------------------------------------------------------------------------------------- corrupt stores

@pytest.fixture
def built(tmp_path, two_groups):
    _, folders = two_groups
    _build(tmp_path / "store", folders)
    return tmp_path / "store"


def test_truncated_token_file_is_detected(built):
    path = built / "code" / "train.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(CorruptStoreError, match="group 'code' split 'train': .*train.bin.* the file is corrupt"):
        TokenStore.open(built)


def test_same_size_corruption_is_found_by_verify(built):
    path = built / "prose" / "val.bin"
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    TokenStore.open(built)  # sizes still agree: the cheap check cannot see it
    with pytest.raises(CorruptStoreError, match="does not match its sha256"):
        TokenStore.open(built, verify=True)


def test_corrupt_index_and_missing_files(built):
    idx = built / "prose" / "test.idx"
    offsets = np.fromfile(idx, dtype="<i8")
    offsets[1], offsets[2] = offsets[2], offsets[1] - 1
    offsets.tofile(idx)
    with pytest.raises(CorruptStoreError, match="non-decreasing offsets"):
        TokenStore.open(built)
    idx.unlink()
    with pytest.raises(FileNotFoundError, match="index file .*test.idx.* is missing"):
        TokenStore.open(built)
    (built / "code" / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="token file .*val.bin.* is missing"):
        TokenStore.open(built, groups=["code"])


def test_bad_manifest(built, tmp_path):
    manifest = built / "manifest.json"
    data = json.loads(manifest.read_text())
    data["groups"][0]["splits"]["train"]["num_tokens"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(CorruptStoreError, match="do not match the manifest fingerprint"):
        TokenStore.open(built)
    manifest.write_text("{ not json")
    with pytest.raises(CorruptStoreError, match="is not valid JSON"):
        TokenStore.open(built)
    with pytest.raises(FileNotFoundError, match="is not a token store: manifest.json is missing"):
        TokenStore.open(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------- windows

def test_windows_define_examples_and_global_ids(built):
    store = TokenStore.open(built, groups=["code", "prose"])
    context = 16
    windows = store.windows("train", context)
    for g, name in enumerate(store.groups):
        n = store.num_tokens(name, "train")
        assert windows.num_examples[g] == (n - context - 1) // context + 1
        stream = np.asarray(store.tokens(name, "train"))
        last = int(windows.num_examples[g]) - 1
        np.testing.assert_array_equal(windows.example(g, last), stream[last * context:last * context + context + 1])
        assert last * context + context + 1 <= n < (last + 1) * context + context + 1
    offsets = windows.offsets
    assert offsets.dtype == torch.int64 and offsets[0] == 0 and offsets[-1] == len(windows)
    assert torch.equal(offsets[1:] - offsets[:-1], torch.from_numpy(windows.num_examples))
    boundary = int(offsets[1])
    ids = torch.tensor([0, boundary - 1, boundary, len(windows) - 1])
    inputs, targets, groups = windows.batch(ids)
    assert inputs.shape == (4, context) and targets.shape == (4, context) and inputs.dtype == torch.int64
    assert groups.tolist() == [0, 0, 1, 1]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    np.testing.assert_array_equal(inputs[2].numpy(), windows.example(1, 0)[:-1])
    np.testing.assert_array_equal(targets[1].numpy(), windows.example(0, boundary - 1)[1:])
    with pytest.raises(IndexError, match=r"sample ids must be in \[0, "):
        windows.batch(torch.tensor([len(windows)]))


def test_windows_with_stride_and_evaluation_subset(built):
    store = TokenStore.open(built)
    windows = store.windows("val", 8, stride=3)
    n = store.num_tokens("prose", "val")
    assert windows.num_examples[0] == (n - 9) // 3 + 1
    np.testing.assert_array_equal(windows.example(0, 2), np.asarray(store.tokens("prose", "val"))[6:15])
    subset = windows.evaluation_ids(5)
    again = windows.evaluation_ids(5)
    assert [len(x) for x in subset] == [5, 5]
    assert all(torch.equal(a, b) for a, b in zip(subset, again))
    assert int(subset[1].min()) >= int(windows.offsets[1])
    full = windows.evaluation_ids()
    assert len(full[0]) == windows.num_examples[0]


def test_windows_refuse_a_split_shorter_than_the_context(built):
    store = TokenStore.open(built)
    longest = max(store.num_tokens(g, "test") for g in store.groups)
    with pytest.raises(ValueError, match="fewer than context_length \\+ 1"):
        store.windows("test", longest)
    with pytest.raises(ValueError, match="context_length must be a positive integer"):
        store.windows("test", 0)


def test_group_subset_selection(built):
    with pytest.raises(ValueError, match=r"groups \['nope'\] are not in the token store"):
        TokenStore.open(built, groups=["nope"])
    store = TokenStore.open(built, groups="code")
    assert store.groups == ["code"]
    with pytest.raises(KeyError, match="group 'prose' is not open"):
        store.tokens("prose", "train")


# ------------------------------------------------------------------------------------------------ importers

def test_import_nanogpt_folder_in_place(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "owt"
    folder.mkdir()
    train = rng.integers(0, 50257, size=5000).astype(np.uint16)
    val = rng.integers(0, 50257, size=700).astype(np.uint16)
    train.tofile(folder / "train.bin")
    val.tofile(folder / "val.bin")
    store = import_token_files(tmp_path / "store", {"web": str(folder)}, vocab_size=50257)
    np.testing.assert_array_equal(np.asarray(store.tokens("web", "train")), train)
    np.testing.assert_array_equal(np.asarray(store.tokens("web", "val")), val)
    assert not (tmp_path / "store" / "web").exists()  # nothing copied: the manifest points at the files
    windows = store.windows("val", 64)
    np.testing.assert_array_equal(windows.example(0, 3), val[192:257])
    with pytest.raises(KeyError, match="group 'web' has no split 'test'"):
        store.tokens("web", "test")


def test_import_single_flat_file_splits_contiguously(tmp_path):
    tokens = np.arange(10000, dtype=np.uint32) % 70000
    tokens.tofile(tmp_path / "all.bin")
    store = import_token_files(tmp_path / "store", {"g": str(tmp_path / "all.bin")}, vocab_size=70000,
                               dtype=np.uint32, val_fraction=0.1, test_fraction=0.2)
    parts = [np.asarray(store.tokens("g", s)) for s in SPLITS]
    assert [len(p) for p in parts] == [7000, 1000, 2000]
    np.testing.assert_array_equal(np.concatenate(parts), tokens)


def test_flat_import_bad_inputs(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptStoreError, match="not a multiple of the uint16 token size"):
        import_token_files(tmp_path / "s", {"g": str(tmp_path / "odd.bin")}, vocab_size=100)
    np.array([1, 2, 300] * 100, dtype=np.uint16).tofile(tmp_path / "big.bin")
    with pytest.raises(CorruptStoreError, match=r"token ids must be in \[0, 257\)"):
        import_token_files(tmp_path / "s", {"g": str(tmp_path / "big.bin")}, vocab_size=257)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_token_files(tmp_path / "s", {"g": str(tmp_path / "none.bin")}, vocab_size=257)
    assert not (tmp_path / "s").exists()
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "ok.bin")
    import_token_files(tmp_path / "s", {"g": str(tmp_path / "ok.bin")}, vocab_size=1000)
    np.arange(1, 1001, dtype=np.uint16).tofile(tmp_path / "ok.bin")  # same size, new content
    with pytest.raises(CorruptStoreError, match="changed since it was imported"):
        TokenStore.open(tmp_path / "s")


def _write_megatron(prefix, documents, dtype=np.int32, code=4, modes=False):
    """Writes the MMapIndexedDataset layout from its specification: one sequence per document."""
    lengths = np.array([len(d) for d in documents], dtype=np.int32)
    np.concatenate([np.asarray(d, dtype=dtype) for d in documents]).tofile(prefix + ".bin")
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    doc_index = np.arange(len(documents) + 1, dtype=np.int64)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        f.write(lengths.tobytes() + pointers.tobytes() + doc_index.tobytes())
        if modes:
            f.write(np.zeros(len(lengths), dtype=np.int8).tobytes())


def test_import_megatron_pair(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, size=int(rng.integers(20, 200))) for _ in range(60)]
    _write_megatron(str(tmp_path / "corpus_text_document"), docs)
    store = import_token_files(tmp_path / "store", {"m": str(tmp_path / "corpus_text_document")},
                               vocab_size=1000, layout="megatron", val_fraction=0.2, test_fraction=0.2)
    parts = [np.asarray(store.tokens("m", s)) for s in SPLITS]
    np.testing.assert_array_equal(np.concatenate(parts), np.concatenate(docs))
    bounds = set(np.concatenate([[0], np.cumsum([len(d) for d in docs])]).tolist())
    assert len(parts[0]) in bounds and len(parts[0]) + len(parts[1]) in bounds  # cuts at document ends
    offsets = store.document_offsets("m", "train")
    first = np.asarray(store.tokens("m", "train"))[offsets[0]:offsets[1]]
    np.testing.assert_array_equal(first, docs[0])


def test_megatron_bad_inputs(tmp_path):
    docs = [np.arange(10), np.arange(5)]
    _write_megatron(str(tmp_path / "mm"), docs, modes=True)
    with pytest.raises(CorruptStoreError, match="multimodal Megatron data"):
        import_token_files(tmp_path / "s", {"m": str(tmp_path / "mm")}, vocab_size=100, layout="megatron")
    _write_megatron(str(tmp_path / "fl"), docs, dtype=np.float32, code=7)
    with pytest.raises(CorruptStoreError, match="dtype code must be an integer type"):
        import_token_files(tmp_path / "s", {"m": str(tmp_path / "fl")}, vocab_size=100, layout="megatron")
    (tmp_path / "junk.idx").write_bytes(b"not an index at all, no magic here....")
    (tmp_path / "junk.bin").write_bytes(b"")
    with pytest.raises(CorruptStoreError, match="is not a Megatron index"):
        import_token_files(tmp_path / "s", {"m": str(tmp_path / "junk")}, vocab_size=100, layout="megatron")
    _write_megatron(str(tmp_path / "short"), docs)
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(CorruptStoreError, match="the pair is corrupt or mismatched"):
        import_token_files(tmp_path / "s", {"m": str(tmp_path / "short")}, vocab_size=100, layout="megatron")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------- default corpus

def test_default_corpus_is_deterministic_and_has_every_split(tmp_path):
    # Small caps keep this fast; wide splits and short pieces make every split non-empty on any installation.
    kwargs = dict(max_chars_per_group=200_000, max_document_chars=512, val_fraction=0.15, test_fraction=0.15)
    a = build_default_corpus(tmp_path / "a", **kwargs)
    b = build_default_corpus(tmp_path / "b", **kwargs)
    assert a.groups == ["code", "headers", "docs", "legal", "records", "dupes", "noise"]
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"]
    for row in a.sizes():
        assert row["train_tokens"] > row["val_tokens"] > 0 and row["test_tokens"] > 0, row
    for group in a.groups:
        digest = hashlib.sha256(np.asarray(a.tokens(group, "train")).tobytes()).hexdigest()
        assert digest == a.manifest["groups"][a.groups.index(group)]["splits"]["train"]["bin_sha256"]
    assert "records" in a.describe() and "share" in a.describe()
    with pytest.raises(ValueError, match="groups must be distinct names from"):
        build_default_corpus(tmp_path / "c", groups=["code", "poetry"])


def test_synthetic_groups_are_what_they_claim():
    noise, _ = collect_group("noise", 20_000)
    text = "".join(t for _, t in noise)
    assert set(text) <= set("0123456789abcdef\n") and len(text) >= 20_000
    lines = text.split("\n")[:-1]
    assert all(len(line) == 64 for line in lines)
    counts = np.bincount([int(c, 16) for c in "".join(lines)], minlength=16)
    # uniform hex digits: chi-square with 15 degrees of freedom, 40 is beyond its 99.9th percentile
    expected = counts.sum() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 40
    dupes, source = collect_group("dupes", 400_000)
    code, _ = collect_group("code", 400_000)
    assert not set(source["base_files"]) & {name for name, _ in code}
    copies = [t for name, t in dupes if name.endswith("/0")]
    assert len(copies) == source["copies_per_file"] >= 2
    assert len(set(copies)) == len(copies)  # every copy is edited ...
    first, second = (set(c.splitlines()) for c in copies[:2])
    assert len(first & second) > 0.8 * len(first)  # ... but only a little


def test_command_line_builds_and_reports_errors(tmp_path, two_groups, capsys):
    from aioli_ext.data.__main__ import main
    _, folders = two_groups
    pairs = [f"{name}={folder}" for name, folder in folders.items()]
    assert main(["prepare-folders", str(tmp_path / "s"), *pairs, "--val-fraction", "0.15",
                 "--test-fraction", "0.15"]) == 0
    assert "prose" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s"), "--verify"]) == 0
    assert main(["prepare-folders", str(tmp_path / "t"), f"x={tmp_path / 'missing'}"]) == 2
    assert "error: group 'x': folder" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
