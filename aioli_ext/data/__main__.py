"""Command line for token stores.

    python -m aioli_ext.data prepare-default OUT [--groups code,docs,...] [--tokenizer NAME]
    python -m aioli_ext.data prepare-folders OUT name=FOLDER [name=FOLDER ...] [--tokenizer NAME]
    python -m aioli_ext.data import OUT name=PATH [...] --vocab-size V [--layout flat|megatron] [--dtype uint16]
    python -m aioli_ext.data info STORE [--verify]
"""
import argparse
import sys

from .builders import build_from_folders
from .default_corpus import DEFAULT_GROUPS, build_default_corpus
from .store import TokenStore, import_token_files


def _pairs(items, what):
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{what} must be given as name=path, got {item!r}")
        out[name] = path
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m aioli_ext.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out")
    common.add_argument("--val-fraction", type=float, default=0.05)
    common.add_argument("--test-fraction", type=float, default=0.05)
    common.add_argument("--overwrite", action="store_true", help="replace an existing token store at OUT")

    d = sub.add_parser("prepare-default", parents=[common], help="the default corpus from this Python installation")
    d.add_argument("--groups", default=",".join(DEFAULT_GROUPS))
    d.add_argument("--tokenizer", default="bytes")
    d.add_argument("--max-chars-per-group", type=int, default=4_000_000)

    f = sub.add_parser("prepare-folders", parents=[common], help="one group per folder of .txt/.jsonl files")
    f.add_argument("groups", nargs="+", metavar="name=FOLDER")
    f.add_argument("--tokenizer", default="bytes")
    f.add_argument("--text-key", default="text")
    f.add_argument("--max-document-chars", type=int, default=None)

    i = sub.add_parser("import", parents=[common], help="existing nanoGPT (flat) or Megatron token files, in place")
    i.add_argument("groups", nargs="+", metavar="name=PATH")
    i.add_argument("--vocab-size", type=int, required=True)
    i.add_argument("--layout", choices=["flat", "megatron"], default="flat")
    i.add_argument("--dtype", default="uint16", help="token type of flat files")

    s = sub.add_parser("info", help="print the groups and their sizes")
    s.add_argument("store")
    s.add_argument("--verify", action="store_true", help="also check checksums and token ranges")

    args = parser.parse_args(argv)
    try:
        store = _run(args)
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(store.describe())
    return 0


def _run(args):
    if args.command == "prepare-default":
        store = build_default_corpus(args.out, groups=args.groups, tokenizer=args.tokenizer,
                                     val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                     max_chars_per_group=args.max_chars_per_group, overwrite=args.overwrite)
    elif args.command == "prepare-folders":
        store = build_from_folders(args.out, _pairs(args.groups, "groups"), tokenizer=args.tokenizer,
                                   val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                   text_key=args.text_key, max_document_chars=args.max_document_chars,
                                   overwrite=args.overwrite)
    elif args.command == "import":
        store = import_token_files(args.out, _pairs(args.groups, "groups"), vocab_size=args.vocab_size,
                                   layout=args.layout, dtype=args.dtype, val_fraction=args.val_fraction,
                                   test_fraction=args.test_fraction, overwrite=args.overwrite)
    else:
        store = TokenStore.open(args.store, verify=args.verify)
    return store


if __name__ == "__main__":
    sys.exit(main())
