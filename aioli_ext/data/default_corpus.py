"""The default corpus: groups assembled from text that the running Python installation carries.

Five groups are read from the installation (always in a fixed order, so the same installation always gives the
same corpus) and two are generated from it deterministically (a counter-based sha256 generator), to hold what
real pretraining data holds besides clean text:

=========  ==========================================================================================
code       Python source of the standard library (no test suites), files taken in sha256(path) order
           up to ``max_chars_per_group`` characters
headers    C headers of Python's include directory
docs       English technical prose: pydoc's topic help (``pydoc_data.topics``), the smallest group
legal      licence texts: Python's LICENSE.txt and the LICENSE/LICENCE/COPYING/NOTICE files of the
           installed packages, many of them near-copies of the same few licences
records    the RECORD files of the installed packages: paths, sha256 digests in base64 and sizes --
           machine-generated, hard, the group with the highest loss
dupes      vendored near-duplicate code: a few standard-library modules that the code group did not
           take, copied many times with small edits (identifiers renamed, numbers changed, comment
           lines added or dropped) -- little new content however much of it is read
noise      random hexadecimal digests, 64 per line: nothing to learn beyond the alphabet and the line
           length, irreducible loss ln 16 per digit; training on it slows learning everywhere else
=========  ==========================================================================================

Sizes are very unequal (docs is a few hundred kB, code is capped at 4 M characters) and, for legal and
records, depend on the packages installed; the manifest records sizes and sources. bench/HEADROOM.md has
the measurements behind this choice.
"""
import hashlib
import os
import re
import sys
import sysconfig

from .builders import DEFAULT_SALT, write_token_store

DEFAULT_GROUPS = ("code", "headers", "docs", "legal", "records", "dupes", "noise")
SYNTHETIC_GROUPS = ("dupes", "noise")
_IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]{3,}\b")
_SUFFIXES = ("_v2", "Ex", "_impl", "2", "_old", "_new", "Base", "_compat")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")
_MAX_LICENCE_BYTES = 1 << 20


def _read_text(path):
    with open(path, "rb") as handle:
        data = handle.read()
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def _walk_sorted(root, keep, skip_dirs=()):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for filename in sorted(filenames):
            if keep(dirpath, filename):
                found.append(os.path.join(dirpath, filename))
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def site_package_dirs():
    """The site-packages folders of the running interpreter (a virtual environment's own, when in one)."""
    paths = sysconfig.get_paths()
    dirs = []
    for key in ("purelib", "platlib"):
        path = os.path.realpath(paths[key])
        if os.path.isdir(path) and path not in dirs:
            dirs.append(path)
    return dirs


def _take_capped(named, max_chars, load):
    """Items (name, source) in sha256(name) order, loaded with ``load``, until ``max_chars`` characters are
    taken: a spread over the whole source that does not depend on how the file system lists it."""
    order = sorted(named, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    texts, total = [], 0
    for name, source in order:
        if max_chars is not None and total >= max_chars:
            break
        text = load(source)
        if text:
            texts.append((name, text))
            total += len(text)
    return texts


def _site_files(keep):
    """(path relative to its site-packages folder, path) of the files ``keep`` accepts, in every site folder:
    names that do not depend on where the environment lives, so a capped selection is the same anywhere."""
    named = []
    for site in site_package_dirs():
        named += [(os.path.relpath(p, site), p) for p in _walk_sorted(site, keep)]
    return named


def _capped(root, files, max_chars):
    return _take_capped([(os.path.relpath(p, root), p) for p in files], max_chars, _read_text)


class _CounterRng:
    """sha256 in counter mode: the same numbers on every machine and numpy version."""

    def __init__(self, key):
        self.key = key.encode()
        self.counter = 0
        self.buffer = b""

    def _bytes(self, count):
        while len(self.buffer) < count:
            self.buffer += hashlib.sha256(self.key + self.counter.to_bytes(8, "little")).digest()
            self.counter += 1
        out, self.buffer = self.buffer[:count], self.buffer[count:]
        return out

    def below(self, n):
        return int.from_bytes(self._bytes(8), "little") % n

    def hex(self, digits):
        return self._bytes((digits + 1) // 2).hex()[:digits]


def _vendored_copies(base, copies):
    """``copies`` edited copies of each base text: per copy two identifiers renamed everywhere, a few numbers
    changed, a few comment lines added or dropped."""
    out = []
    for b, text in enumerate(base):
        names = sorted(set(_IDENTIFIER.findall(text)))
        for c in range(copies):
            rng = _CounterRng(f"dupes/{b}/{c}")
            edited = text
            for _ in range(2):
                name = names[rng.below(len(names))]
                edited = re.sub(rf"\b{re.escape(name)}\b", name + _SUFFIXES[rng.below(len(_SUFFIXES))], edited)
            lines = edited.split("\n")
            for _ in range(3):
                i = rng.below(len(lines))
                digits = [m.start() for m in re.finditer(r"[0-9]", lines[i])]
                if digits:
                    at = digits[rng.below(len(digits))]
                    lines[i] = lines[i][:at] + str(rng.below(10)) + lines[i][at + 1:]
            for _ in range(2):
                i = rng.below(len(lines))
                if lines[i].lstrip().startswith("#") and rng.below(2):
                    del lines[i]
                else:
                    lines.insert(i, " " * (len(lines[i]) - len(lines[i].lstrip())) + f"# copy {rng.hex(6)}")
            out.append((f"copy{c:04d}/{b}", "\n".join(lines)))
    return out


def _noise_documents(total_chars, lines_per_document=32):
    out, size, d = [], 0, 0
    while size < total_chars:
        rng = _CounterRng(f"noise/{d}")
        text = "".join(rng.hex(64) + "\n" for _ in range(lines_per_document))
        out.append((f"noise{d:06d}", text))
        size += len(text)
        d += 1
    return out


def collect_group(group, max_chars_per_group=None, dupes_base_chars=24_000):
    """(list of (relative name, text), source description) for one default-corpus group."""
    paths = sysconfig.get_paths()
    if group == "code":
        root = os.path.realpath(paths["stdlib"])
        files = _walk_sorted(root, lambda d, f: f.endswith(".py"), _SKIP_DIRS)
        texts = _capped(root, files, max_chars_per_group)
        source = {"kind": "python-stdlib-source", "root": root, "files_available": len(files)}
    elif group == "headers":
        root = os.path.realpath(paths["include"])
        files = _walk_sorted(root, lambda d, f: f.endswith(".h"))
        texts = _capped(root, files, max_chars_per_group)
        source = {"kind": "python-c-headers", "root": root, "files_available": len(files)}
    elif group == "docs":
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        texts = _take_capped([(name, topics[name]) for name in sorted(topics)], max_chars_per_group,
                             lambda text: text)
        source = {"kind": "pydoc-topics", "root": os.path.realpath(pydoc_data.topics.__file__),
                  "files_available": len(texts)}
    elif group == "legal":
        stdlib = os.path.realpath(paths["stdlib"])
        named = [("LICENSE.txt", p) for p in [os.path.join(stdlib, "LICENSE.txt")] if os.path.isfile(p)]
        named += _site_files(lambda d, f: f.upper().startswith(_LICENCE_PREFIXES)
                             and os.path.getsize(os.path.join(d, f)) <= _MAX_LICENCE_BYTES)
        texts = _take_capped(named, max_chars_per_group, _read_text)
        source = {"kind": "licence-files", "roots": [stdlib] + site_package_dirs(), "files_available": len(named)}
    elif group == "records":
        named = _site_files(lambda d, f: f == "RECORD" and d.endswith(".dist-info"))
        texts = _take_capped(named, max_chars_per_group, _read_text)
        source = {"kind": "dist-info-RECORD-files", "roots": site_package_dirs(), "files_available": len(named)}
    elif group == "dupes":
        root = os.path.realpath(paths["stdlib"])
        files = _walk_sorted(root, lambda d, f: f.endswith(".py"), _SKIP_DIRS)
        taken = {name for name, _ in _capped(root, files, max_chars_per_group)}
        # the base modules come from the far end of the code group's order, so none of them is in it
        spare = [(os.path.relpath(p, root), p) for p in files if os.path.relpath(p, root) not in taken
                 and 3000 <= os.path.getsize(p) <= 12000]
        spare.sort(key=lambda item: hashlib.sha256(item[0].encode()).hexdigest(), reverse=True)
        base = _take_capped(spare, dupes_base_chars, _read_text)
        copies = max(1, (max_chars_per_group or 2_000_000) // 2 // max(1, sum(len(t) for _, t in base)))
        texts = _vendored_copies([t for _, t in base], min(copies, 200))
        source = {"kind": "synthetic-near-duplicates", "root": root, "base_files": [n for n, _ in base],
                  "copies_per_file": min(copies, 200), "files_available": len(base)}
    elif group == "noise":
        texts = _noise_documents(min(max_chars_per_group or 1_000_000, 1_000_000))
        source = {"kind": "synthetic-random-hex", "files_available": len(texts)}
    else:
        raise ValueError(f"group must be one of {list(DEFAULT_GROUPS)}, got {group!r}")
    if not texts:
        raise ValueError(f"default corpus group {group!r}: this Python installation ({sys.prefix}) has no "
                         f"files for it ({source})")
    source.update({"files": len(texts), "chars": sum(len(t) for _, t in texts),
                   "python": sys.version.split()[0]})
    return texts, source


def build_default_corpus(out_dir, groups=DEFAULT_GROUPS, tokenizer=None, val_fraction=0.05, test_fraction=0.05,
                         max_chars_per_group=4_000_000, max_document_chars=2048, salt=DEFAULT_SALT,
                         overwrite=False):
    """Write the default corpus (``groups``: a subset of ``DEFAULT_GROUPS``, in order) as a token store.

    Documents are cut into pieces of at most ``max_document_chars`` characters before the hash split, so even
    the small groups get val and test sets of a few hundred windows.
    """
    if isinstance(groups, str):
        groups = [g for g in groups.split(",") if g]
    unknown = [g for g in groups if g not in DEFAULT_GROUPS]
    if unknown or not groups or len(set(groups)) != len(groups):
        raise ValueError(f"groups must be distinct names from {list(DEFAULT_GROUPS)}, got {list(groups)}")
    plan = {}
    for group in groups:
        texts, source = collect_group(group, max_chars_per_group)
        plan[group] = ([t for _, t in texts], source)
    return write_token_store(out_dir, plan, tokenizer, val_fraction, test_fraction, salt, max_document_chars,
                             overwrite, extra={"corpus": "aioli_ext-default",
                                               "max_chars_per_group": max_chars_per_group})
