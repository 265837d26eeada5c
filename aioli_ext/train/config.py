"""Settings of one training run: a flat dataclass that the CLI flags, a JSON config file and the checkpoint share.

Every field can be set from the command line (``--field-name``) or from a JSON file (``--config run.json``,
keys = field names); flags given explicitly win over the file. ``validate`` checks every value with a message
that names the setting and the rule, before anything is written.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..mixing.aioli import Aioli
from ..mixing.lmo import LP_BASES, OBJECTIVES

METHODS = ("aioli", "stratified", "static", "skillit", "doremi")
# The TrainConfig fields each method's mixer reads (build_mixer in loop.py).
METHOD_SETTINGS = {
    "aioli": ("update_steps", "rounds", "lp_sweeps", "lp_steps", "one_hot", "lp_base", "eta", "ema", "diagonal",
              "objective", "prior", "prior_run", "prior_steps"),
    "stratified": (),
    "static": ("proportions",),
    "skillit": ("update_steps", "rounds", "skills_graph", "skillit_eta", "skillit_window"),
    "doremi": ("update_steps", "rounds", "reference_losses", "reference_run", "doremi_step_size",
               "doremi_smoothing"),
}
MIXER_SETTINGS = {name for names in METHOD_SETTINGS.values() for name in names}
# Settings added after runs were saved, with the value those runs behaved as: a checkpoint or result without
# one of them resumes as that value. Only listed settings get this; any other missing setting is a change.
# The mixer's own table is the one source (its setting names are the run's).
SETTINGS_ADDED = dict(Aioli.config_added)


@dataclass
class TrainConfig:
    # data
    corpus: str = "runs/corpus"
    groups: Optional[List[str]] = None
    # method
    method: str = "aioli"
    seed: int = 0
    # model
    context: int = 128
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    # optimisation
    steps: int = 1000
    batch: int = 16
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # evaluation
    eval_windows: int = 32
    eval_batch: int = 64
    eval_every: int = 100
    test_windows: int = 256
    # Aioli
    update_steps: int = 100
    rounds: Optional[int] = None
    lp_sweeps: int = 2
    lp_steps: int = 2
    one_hot: float = 0.75
    lp_base: str = "uniform"
    eta: float = 0.3
    ema: Optional[float] = None
    diagonal: bool = False
    objective: str = "loss"
    prior: Optional[List[float]] = None
    prior_run: Optional[str] = None
    prior_steps: int = 0
    # static
    proportions: Optional[List[float]] = None
    # Skill-It
    skills_graph: Optional[List[List[float]]] = None
    skillit_eta: float = 0.5
    skillit_window: int = 3
    # DoReMi
    reference_losses: Optional[List[float]] = None
    reference_run: Optional[str] = None
    doremi_step_size: float = 1.0
    doremi_smoothing: float = 1e-3
    # run control
    sampler_mode: str = "systematic"
    device: str = "cpu"
    threads: int = 1
    checkpoint_every: int = 100
    out: str = "runs/train"
    progress: bool = True

    def to_dict(self):
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # Settings that change the numbers a run produces; run-control fields (output folder, progress bar,
    # thread count, checkpoint frequency, device) do not (beyond float rounding), so a resume may change them,
    # and neither do the settings of the other methods' mixers (a stratified run's one_hot is unused).
    # The number of processes is not a setting at all: batch is the global batch, whatever the world size.
    def numeric_settings(self):
        skip = {"out", "progress", "threads", "checkpoint_every", "corpus", "device"}
        skip |= MIXER_SETTINGS - set(METHOD_SETTINGS[self.method])
        return {k: v for k, v in self.to_dict().items() if k not in skip}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config_file(path):
    """Read a JSON object of TrainConfig fields; unknown keys are an error that lists the known ones."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: file {path!r} does not exist")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except ValueError as exc:
        raise ValueError(f"--config: {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a JSON object of settings")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"--config: unknown settings {unknown} in {path!r}; known: {sorted(FIELDS)}")
    return data


def _positive_int(cfg, name, minimum=1):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _number(cfg, name, low=None, high=None, low_open=False):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def validate(cfg: TrainConfig, num_groups: Optional[int] = None):
    """Check every setting; ``num_groups`` (when known) also checks per-group lists. Raises ValueError."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {cfg.method!r}")
    for name in ("context", "d_model", "layers", "heads", "steps", "batch", "eval_windows", "eval_batch",
                 "eval_every", "test_windows", "update_steps", "lp_sweeps", "lp_steps", "threads",
                 "checkpoint_every", "skillit_window"):
        _positive_int(cfg, name)
    for name in ("seed", "warmup", "prior_steps"):
        _positive_int(cfg, name, minimum=0)
    if cfg.rounds is not None:
        _positive_int(cfg, "rounds")
    _number(cfg, "lr", low=0.0, low_open=True)
    _number(cfg, "min_lr_ratio", low=0.0, high=1.0)
    _number(cfg, "weight_decay", low=0.0)
    _number(cfg, "beta1", low=0.0, high=1.0)
    _number(cfg, "beta2", low=0.0, high=1.0)
    _number(cfg, "grad_clip", low=0.0)
    _number(cfg, "eta", low=0.0, low_open=True)
    _number(cfg, "one_hot", low=0.0, high=1.0, low_open=True)
    _number(cfg, "skillit_eta", low=0.0, low_open=True)
    _number(cfg, "doremi_step_size", low=0.0, low_open=True)
    _number(cfg, "doremi_smoothing", low=0.0, high=1.0)
    if cfg.ema is not None:
        _number(cfg, "ema", low=0.0, high=1.0)
    if cfg.lp_base not in LP_BASES:
        raise ValueError(f"lp_base must be one of {list(LP_BASES)}, got {cfg.lp_base!r}")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {cfg.objective!r}")
    if cfg.sampler_mode not in ("iid", "systematic"):
        raise ValueError(f"sampler_mode must be 'iid' or 'systematic', got {cfg.sampler_mode!r}")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (each process then uses cuda:LOCAL_RANK), got "
                         f"{cfg.device!r}")
    if cfg.warmup >= cfg.steps:
        raise ValueError(f"warmup must be fewer than steps = {cfg.steps}, got {cfg.warmup}")
    if cfg.d_model % cfg.heads:
        raise ValueError(f"d_model must be divisible by heads, got d_model={cfg.d_model}, heads={cfg.heads}")
    if cfg.groups is not None:
        if not isinstance(cfg.groups, list) or not cfg.groups or len(set(cfg.groups)) != len(cfg.groups):
            raise ValueError(f"groups must be a non-empty list of distinct group names, got {cfg.groups!r}")
    if cfg.method == "static" and cfg.proportions is None:
        raise ValueError("method 'static' needs proportions (--proportions 0.9,0.1)")
    for name in ("reference_run", "prior_run"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be the path of a finished run (folder or result.json), got {value!r}")
    if cfg.reference_losses is not None and cfg.reference_run is not None:
        raise ValueError("give reference_losses or reference_run for DoReMi, not both")
    if cfg.prior is not None and cfg.prior_run is not None:
        raise ValueError("give prior or prior_run for Aioli's restricted mode, not both")
    if num_groups is not None:
        for name in ("proportions", "prior", "reference_losses"):
            value = getattr(cfg, name)
            if value is None:
                continue
            if len(value) != num_groups or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
                raise ValueError(f"{name} must hold {num_groups} finite numbers (one per group), got {value!r}")
            if name != "reference_losses" and (min(value) < 0 or sum(value) <= 0):
                raise ValueError(f"{name} must be non-negative and not all zero, got {value!r}")
        if cfg.skills_graph is not None:
            graph = cfg.skills_graph
            if len(graph) != num_groups or any(len(row) != num_groups for row in graph):
                raise ValueError(f"skills_graph must be a {num_groups}x{num_groups} matrix, got {graph!r}")
    return cfg
