"""``aioli-ext`` (or ``python -m aioli_ext``): prepare a corpus, train with a mixer, compare mixers, run the study.

    aioli-ext prepare                          # the default corpus (from this Python installation) in runs/corpus
    aioli-ext prepare prepare-folders OUT code=dir1 web=dir2   # any `python -m aioli_ext.data` command
    aioli-ext train --method aioli --groups code,noise --out runs/train-aioli
    aioli-ext compare --methods stratified,aioli --seeds 0-4 --groups code,noise --jobs 2 --out runs/compare
    aioli-ext study --settings two,three,full --seeds 0-4 --jobs 2

Every training setting is a flag (``aioli-ext train --help``) or a key of a JSON file given with --config;
explicit flags win over the file.
"""
import argparse
import dataclasses
import json
import os
import sys
import typing

DEFAULT_CORPUS = os.path.join("runs", "corpus")

_HELP = {
    "corpus": "token store folder (aioli-ext prepare makes one)",
    "groups": "comma-separated group names, in order (default: all groups of the corpus)",
    "method": "data mixer",
    "seed": "fixes the initial weights, the data order and Aioli's sweep orders",
    "steps": "optimizer steps", "batch": "sequences per step", "context": "tokens per sequence",
    "lr": "peak learning rate (AdamW)", "warmup": "linear warm-up steps before the cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "eval_windows": "validation windows per group for the mixer's evaluations (fixed subset)",
    "eval_every": "steps between points of the validation-loss curve",
    "test_windows": "test windows per group for the final perplexity",
    "update_steps": "Aioli/Skill-It/DoReMi: steps per round", "rounds": "number of rounds (default: as many as fit)",
    "lp_sweeps": "Aioli: LearnParams sweeps per round (k)", "lp_steps": "Aioli: steps per LearnParams sub-phase (s)",
    "one_hot": "Aioli: mass on the hot group in a sub-phase (around uniform)",
    "lp_base": "Aioli: what the LearnParams sub-phases perturb: uniform (the paper) or the current mixture",
    "eta": "Aioli: exponentiated-gradient step size",
    "ema": "Aioli: EMA of the interaction matrix (default: cumulative EG)",
    "diagonal": "Aioli: estimate only the diagonal of A",
    "objective": "Aioli: what the EG step lowers: the sum of group losses (loss) or of perplexities (perplexity)",
    "prior": "Aioli: restricted-mode prior proportions",
    "prior_run": "Aioli: a finished run (folder or result.json) whose last mixture is the prior, e.g. a cheap proxy "
                 "run; {seed} in the path becomes the run's seed",
    "prior_steps": "Aioli: steps on the prior before the rounds", "proportions": "static: the fixed mixture",
    "skills_graph": "Skill-It: JSON m x m matrix (default: identity)",
    "reference_losses": "DoReMi: reference model's per-group validation losses",
    "reference_run": "DoReMi: a finished run (folder or result.json) whose final validation losses are the reference; "
                     "{seed} in the path becomes the run's seed",
    "sampler_mode": "MixtureSampler mode",
    "device": "cpu or cuda (under torchrun: gloo on the CPU, NCCL and cuda:LOCAL_RANK on GPUs)",
    "threads": "torch threads per process", "checkpoint_every": "steps between checkpoints",
    "out": "output folder", "progress": "progress bar",
}


def _base_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation


def _list_parser(item_type, name):
    def parse(text):
        try:
            values = [item_type(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be a comma-separated list of "
                                             f"{item_type.__name__}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must not be empty")
        return values
    return parse


def _json_parser(name):
    def parse(text):
        try:
            return json.loads(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be JSON, got {text!r}") from None
    return parse


def add_config_flags(parser, skip=()):
    from .mixing.lmo import LP_BASES, OBJECTIVES
    from .train.config import METHODS, TrainConfig
    parser.add_argument("--config", help="JSON file of settings (keys = the flag names with underscores)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        default = f.default
        help_text = _HELP.get(f.name, "") + f" (default: {default})"
        if f.name == "method":
            parser.add_argument(flag, choices=METHODS, default=None, help=help_text)
        elif f.name == "skills_graph":
            parser.add_argument(flag, type=_json_parser(f.name), default=None, help=help_text)
        elif typing.get_origin(kind) in (list, typing.List):
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, type=_list_parser(item, f.name), default=None, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "sampler_mode":
            parser.add_argument(flag, choices=("iid", "systematic"), default=None, help=help_text)
        elif f.name == "objective":
            parser.add_argument(flag, choices=OBJECTIVES, default=None, help=help_text)
        elif f.name == "lp_base":
            parser.add_argument(flag, choices=LP_BASES, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def config_from_args(args, **overrides):
    from .train.config import FIELDS, TrainConfig, load_config_file
    values = {}
    if args.config:
        values.update(load_config_file(args.config))
    for name in FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    values.update(overrides)
    if "corpus" not in values:
        values["corpus"] = DEFAULT_CORPUS
    return TrainConfig(**values)


def _explicit_settings(args):
    """Names of the TrainConfig fields that the command line or its --config file set."""
    from .train.config import FIELDS, load_config_file
    given = {name for name in FIELDS if getattr(args, name, None) is not None}
    if args.config:
        given |= set(load_config_file(args.config))
    return given


def _seeds(text):
    seeds = []
    try:
        for part in text.split(","):
            if "-" in part:
                low, high = part.split("-")
                seeds.extend(range(int(low), int(high) + 1))
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must look like 0-4 or 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must name non-negative seeds, got {text!r}")
    return seeds


def _methods(text):
    from .train.config import METHODS
    methods = [m for m in text.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"--methods must be a comma-separated subset of {list(METHODS)}, "
                                         f"got {text!r}")
    return methods


def build_parser():
    parser = argparse.ArgumentParser(prog="aioli-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a token store (default: the default corpus in runs/corpus)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    t = sub.add_parser("train", help="one training run")
    add_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    t.add_argument("--stop-at-step", type=int, default=None,
                   help="save a checkpoint after this many steps and exit (resume later with --resume)")
    c = sub.add_parser("compare", help="methods x paired seeds, in parallel processes")
    add_config_flags(c, skip=("method", "seed", "threads", "progress"))
    c.add_argument("--methods", type=_methods, default=["stratified", "aioli"])
    c.add_argument("--seeds", type=_seeds, default=list(range(5)), help="e.g. 0-4 (default) or 0,3,7")
    c.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each")
    c.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue the others")
    s = sub.add_parser("study", help="compare on the two-group, three-group and full settings")
    add_config_flags(s, skip=("method", "seed", "threads", "progress", "groups"))
    s.add_argument("--settings", default="two,three,full", help="comma-separated subset of two,three,full")
    s.add_argument("--methods", type=_methods, default=["stratified", "aioli"])
    s.add_argument("--seeds", type=_seeds, default=list(range(5)))
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--results", default=os.path.join("bench", "results"), help="where the study tables go")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--proxy", action="store_true",
                   help="first train Aioli on a smaller proxy model per seed, then start each Aioli run from its "
                        "proxy's last mixture (tables: study_prior_<setting>.*)")
    s.add_argument("--proxy-one-hot", type=float, default=None,
                   help="with --proxy: one_hot of the proxy's LearnParams sub-phases (default: the setting's "
                        "PROXY_TUNED value, 0.75; the main runs keep their own: the setting's FROM_PROXY_TUNED, "
                        "else TUNED value)")
    s.add_argument("--proxy-eta", type=float, default=None,
                   help="with --proxy: the proxy's EG step size (default: the setting's PROXY_TUNED value, else "
                        "--eta's)")
    from .mixing.lmo import OBJECTIVES
    s.add_argument("--proxy-objective", choices=OBJECTIVES, default=None,
                   help="with --proxy: the proxy's EG objective (default: the setting's PROXY_TUNED value, else "
                        "--objective's)")
    return parser


def _prepare(rest):
    from .data import TokenStore
    from .data.__main__ import main as data_main
    if not rest:
        if os.path.isfile(os.path.join(DEFAULT_CORPUS, "manifest.json")):
            try:
                print(TokenStore.open(DEFAULT_CORPUS).describe())
                print(f"(already prepared; `aioli-ext prepare prepare-default {DEFAULT_CORPUS} --overwrite` "
                      f"rebuilds it)")
                return 0
            except (OSError, ValueError):
                pass
        rest = ["prepare-default", DEFAULT_CORPUS, "--overwrite"] if os.path.isdir(DEFAULT_CORPUS) else \
            ["prepare-default", DEFAULT_CORPUS]
    return data_main(rest)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return _prepare(args.rest)
    from .train.loop import RunError
    try:
        if args.command == "train":
            from .train.loop import train
            cfg = config_from_args(args)
            result = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_at_step=args.stop_at_step)
            if os.environ.get("RANK", "0") != "0":
                return 0  # under torchrun, rank 0 reports for all
            if result is None:
                print(f"stopped after {args.stop_at_step} steps; checkpoint in {cfg.out} (continue with --resume)")
            else:
                print(f"{cfg.method} seed {cfg.seed}: test PPL "
                      + ", ".join(f"{g} {p:.3f}" for g, p in zip(result["groups"], result["test_ppl"]))
                      + f"; average {result['avg_test_ppl']:.3f}  ({cfg.out}/result.json, run.png)")
            return 0
        if args.command == "compare":
            from .train.compare import compare
            if args.jobs < 1:
                raise RunError(f"--jobs must be >= 1, got {args.jobs}")
            cfg = config_from_args(args, **({} if args.out or (args.config and "out" in
                                                                 json.load(open(args.config))) else
                                            {"out": os.path.join("runs", "compare")}))
            summary = compare(cfg, args.methods, args.seeds, jobs=args.jobs, out=cfg.out, resume=args.resume,
                              title=" + ".join(cfg.groups) if cfg.groups else "")
            with open(os.path.join(cfg.out, "compare.md")) as handle:
                print(handle.read())
            print(f"written: {cfg.out}/compare.json, compare.csv, compare.md, compare.png")
            return 0 if summary else 1
        if args.command == "study":
            from .train.study import PROXY_KEYS, SETTINGS, study
            settings = [s for s in args.settings.split(",") if s]
            unknown = [s for s in settings if s not in SETTINGS]
            if unknown or not settings:
                raise RunError(f"--settings must be a comma-separated subset of {list(SETTINGS)}, got "
                               f"{args.settings!r}")
            if args.jobs < 1:
                raise RunError(f"--jobs must be >= 1, got {args.jobs}")
            # study() refuses proxy settings without --proxy, naming the flags, before anything runs.
            proxy_settings = {key: getattr(args, f"proxy_{key}") for key in PROXY_KEYS
                              if getattr(args, f"proxy_{key}") is not None}
            cfg = config_from_args(args, **({} if args.out else {"out": os.path.join("runs", "study")}))
            study(cfg, settings, args.methods, args.seeds, jobs=args.jobs, out=cfg.out, results=args.results,
                  resume=args.resume, explicit=_explicit_settings(args), proxy=args.proxy,
                  proxy_settings=proxy_settings)
            prefix = "study_prior" if args.proxy else "study"
            print(f"written: {args.results}/{prefix}.md and {prefix}_<setting>.json/.csv/.md/.png")
            return 0
    except (RunError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
