"""One training run: a small GPT on a token store, batches from MixtureSampler at the mixer's proportions.

Order inside every step (the mixer protocol of :mod:`aioli_ext.mixing.base`): evaluate if the mixer (or the
validation curve) wants it, ask the mixer for the step's exact group counts, draw the batch, take one AdamW
step. Checkpoints hold the model, the optimiser, the sampler, the mixer (its RNG and log included), the torch
RNG and the run's history, so a resumed run continues bit for bit.

Data parallel (``torchrun --nproc-per-node N -m aioli_ext train ...``): ``batch`` stays the global batch and
each rank trains on its slice of it (the sampler's rank view of the one global stream). Gradients are averaged
by DistributedDataParallel; the mixer's per-group validation statistics are all-reduced once per evaluation
(2K numbers in one float64 tensor), and the step's train-loss sum and drawn group counts once per step (1 + K
numbers), so every rank holds the same history and takes the same mixer decisions without any broadcast.
Checkpoints hold no rank-specific state: rank 0 writes them, every rank reads them, and a run may resume with
another number of processes.
"""
import json
import math
import os
import platform
import time

import torch

from .. import distributed
from ..data import TokenStore
from ..losses import group_linear_cross_entropy
from ..mixing import MIXERS, GroupEvaluator, MixerSettingsMismatch
from ..model import GPT, GPTConfig
from ..sampler import MixtureSampler
from .checkpoint import load_checkpoint, save_checkpoint, write_json_atomic
from .config import SETTINGS_ADDED, TrainConfig, validate

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


class RunError(ValueError):
    """A run cannot start (bad settings, data or checkpoint); the message says which and why."""


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr over cfg.warmup steps, then cosine down to cfg.lr * cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def finished_run(path, setting, seed, groups, key):
    """``result[key]`` of a finished run that a setting names: ``path`` is its folder or its result.json, with
    ``{seed}`` replaced by ``seed`` (so one setting serves every seed of a ``compare``). ``groups``: this run's
    group names, or an int (only the count is checked). Raises RunError naming ``setting``."""
    path = path.replace("{seed}", str(seed))
    if os.path.isdir(path):
        path = os.path.join(path, RESULT)
    if not os.path.isfile(path):
        raise RunError(f"{setting}: {path!r} does not exist (give a finished run's folder or its {RESULT})")
    try:
        with open(path) as handle:
            result = json.load(handle)
        theirs = list(result["groups"])
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{setting}: {path!r} is not the {RESULT} of a finished run") from None
    if isinstance(groups, int):
        if len(theirs) != groups:
            raise RunError(f"{setting}: {path!r} has {len(theirs)} groups, this run has {groups}")
    elif theirs != list(groups):
        raise RunError(f"{setting}: {path!r} has groups {theirs}, this run has {list(groups)} (same names, same "
                       f"order)")
    if not result.get(key):
        raise RunError(f"{setting}: {path!r} holds no {key!r}; it is not the {RESULT} of a finished run")
    return result[key]


def _reference_losses(cfg, num_groups, groups):
    if cfg.reference_losses is not None:
        return [float(x) for x in cfg.reference_losses]
    if cfg.reference_run is not None:
        return finished_run(cfg.reference_run, "reference_run", cfg.seed, groups, "final_val_loss")
    # Without a reference model every excess loss is the loss itself: DoReMi then favours the hardest groups.
    return [0.0] * num_groups


def _prior(cfg, groups):
    if cfg.prior_run is None:
        return cfg.prior
    # The mixture of the finished run's last step: for Aioli, its last round's mixture (rounds end in training).
    return finished_run(cfg.prior_run, "prior_run", cfg.seed, groups, "proportions")[-1]


def build_mixer(cfg: TrainConfig, num_groups: int, groups=None):
    """The mixer of ``cfg.method`` for a run of ``cfg.steps`` steps over ``num_groups`` groups. ``groups``: their
    names, checked against a ``reference_run`` or ``prior_run`` (without them only the count is checked)."""
    named = num_groups if groups is None else list(groups)
    if groups is not None and len(named) != num_groups:
        raise ValueError(f"groups must name num_groups = {num_groups} groups, got {named!r}")
    if cfg.method == "aioli":
        return MIXERS["aioli"](num_groups, update_steps=cfg.update_steps, lp_sweeps=cfg.lp_sweeps,
                               lp_steps=cfg.lp_steps, one_hot=cfg.one_hot, lp_base=cfg.lp_base, eta=cfg.eta,
                               ema=cfg.ema, diagonal=cfg.diagonal, objective=cfg.objective,
                               prior=_prior(cfg, named), prior_steps=cfg.prior_steps, rounds=cfg.rounds,
                               total_steps=cfg.steps, seed=cfg.seed)
    if cfg.method == "stratified":
        return MIXERS["stratified"](num_groups)
    if cfg.method == "static":
        return MIXERS["static"](num_groups, cfg.proportions)
    if cfg.method == "skillit":
        graph = cfg.skills_graph if cfg.skills_graph is not None else torch.eye(num_groups, dtype=torch.float64)
        return MIXERS["skillit"](num_groups, skills_graph=graph, update_steps=cfg.update_steps,
                                 eta=cfg.skillit_eta, window=cfg.skillit_window, rounds=cfg.rounds,
                                 total_steps=cfg.steps)
    return MIXERS["doremi"](num_groups, reference_losses=_reference_losses(cfg, num_groups, named),
                            update_steps=cfg.update_steps, step_size=cfg.doremi_step_size,
                            smoothing=cfg.doremi_smoothing, rounds=cfg.rounds, total_steps=cfg.steps)


class Run:
    """Everything a run holds; built and checked before anything is written."""

    def __init__(self, cfg: TrainConfig, device=None):
        try:
            validate(cfg)
            store = TokenStore.open(cfg.corpus, groups=cfg.groups)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(str(exc)) from None
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        if cfg.batch % self.world_size:
            raise RunError(f"batch ({cfg.batch}) is the global batch and must be divisible by the number of "
                           f"processes ({self.world_size})")
        self.device = torch.device(cfg.device if device is None else device)
        self.cfg = cfg
        self.store = store
        self.groups = list(store.groups)
        k = len(self.groups)
        try:
            validate(cfg, num_groups=k)
            if cfg.method in ("aioli",) and k < 2:
                raise ValueError(f"method 'aioli' needs at least 2 groups, got {self.groups}")
            self.train_windows = store.windows("train", cfg.context)
            self.val_windows = store.windows("val", cfg.context)
            self.test_windows = store.windows("test", cfg.context)
            self.mixer = build_mixer(cfg, k, self.groups)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(str(exc)) from None
        self.num_groups = k
        self.val_evaluator = self._evaluator(self.val_windows, cfg.eval_windows)
        self.model = GPT(GPTConfig(vocab_size=store.vocab_size, context_length=cfg.context, d_model=cfg.d_model,
                                   n_layers=cfg.layers, n_heads=cfg.heads), seed=cfg.seed).to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        # The sampler stays on the CPU whatever the device: its ids index memory-mapped token files, and CPU
        # and CUDA draws are identical anyway. Its state is the global stream's; rank/world_size only pick the
        # slice, so a checkpoint resumes under any number of processes.
        self.sampler = MixtureSampler(self.train_windows.num_examples.tolist(), seed=cfg.seed,
                                      mode=cfg.sampler_mode, rank=self.rank, world_size=self.world_size)
        # Training steps go through DDP (gradients averaged over ranks, overlapped with backward); evaluations
        # call the bare model, under no_grad, with the evaluator's own all-reduce. Every rank builds the same
        # initial weights from the seed, and DDP's construction-time broadcast from rank 0 makes sure of it.
        self.train_model = self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.step = 0
        self.history = {"train_loss": [], "group_counts": [], "val_curve": [], "train_seconds": 0.0}

    def _evaluator(self, windows, per_group):
        sequences = []
        for ids in windows.evaluation_ids(per_group):
            tokens, _ = windows.gather(ids)
            sequences.append(tokens)
        return GroupEvaluator.from_group_sequences(sequences, batch_size=self.cfg.eval_batch,
                                                   device=None if self.device.type == "cpu" else self.device)

    def forward(self, inputs):
        return self.model(inputs), self.model.lm_head.weight

    # ---- checkpoint -----------------------------------------------------------------------------------------
    def state_dict(self):
        return {"format": "aioli_ext-train-checkpoint", "version": 1, "step": self.step,
                "settings": self.cfg.numeric_settings(), "groups": self.groups,
                "corpus_fingerprint": self.store.manifest.get("fingerprint"),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "mixer": self.mixer.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": self.history, "world_size": self.world_size}

    def check_same_run(self, settings, fingerprint, where):
        """A checkpoint or a finished result may only be resumed with the settings and corpus that made it."""
        # Compared as JSON values: a result file holds lists where the config may hold tuples.
        ours = json.loads(json.dumps(self.cfg.numeric_settings()))
        settings = json.loads(json.dumps(settings))
        # A setting added after it was made is missing from it: that run behaved as SETTINGS_ADDED says.
        settings = {**{k: v for k, v in SETTINGS_ADDED.items() if k in ours}, **settings}
        changed = sorted(k for k in ours if settings.get(k) != ours[k])
        if changed:
            detail = ", ".join(f"{k}: {settings.get(k)!r} -> {ours[k]!r}" for k in changed)
            raise RunError(f"--resume: {where} was made with other settings ({detail}); resume with the same "
                           f"settings or start a new run (--overwrite)")
        if fingerprint != self.store.manifest.get("fingerprint"):
            raise RunError(f"--resume: {where} was made on another corpus (fingerprint differs)")

    def load_state_dict(self, state, where):
        if state.get("format") != "aioli_ext-train-checkpoint":
            raise RunError(f"{where} is not a training checkpoint")
        self.check_same_run(state["settings"], state["corpus_fingerprint"], where)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        try:
            self.mixer.load_state_dict(state["mixer"])
        except ValueError as exc:
            differing = exc.differing if isinstance(exc, MixerSettingsMismatch) else {}
            if self.cfg.prior_run is not None and "prior" in differing:
                # prior_run names a file, not a mixture: the run re-reads it on resume, and the file may have
                # been replaced (a proxy run again) since the run started.
                saved, ours = ([round(x, 4) for x in p.tolist()] if p is not None else None
                               for p in differing["prior"])
                raise RunError(f"--resume: prior_run {self.cfg.prior_run!r} now holds the mixture {ours}, but "
                               f"{where} started from {saved}; restore that run or start a new one "
                               f"(--overwrite)") from None
            raise RunError(f"--resume: {where}: {exc}") from None
        torch.set_rng_state(state["torch_rng"])
        self.history = state["history"]
        self.step = int(state["step"])


def prepare_output(cfg: TrainConfig, resume: bool, overwrite: bool):
    """Check what the output folder holds against --resume/--overwrite; returns the checkpoint path to load."""
    checkpoint = os.path.join(cfg.out, CHECKPOINT)
    result = os.path.join(cfg.out, RESULT)
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise RunError(f"out: {cfg.out!r} exists and is not a folder")
    has_state = os.path.isfile(checkpoint) or os.path.isfile(result)
    if has_state and not (resume or overwrite):
        raise RunError(f"out: {cfg.out!r} already holds a run; pass --resume to continue it or --overwrite to "
                       f"start again")
    if overwrite and distributed.is_main():
        for name in (CHECKPOINT, RESULT):
            path = os.path.join(cfg.out, name)
            if os.path.isfile(path):
                os.remove(path)
    return checkpoint if resume and os.path.isfile(checkpoint) else None


def train(cfg: TrainConfig, *, resume=False, overwrite=False, stop_at_step=None, progress=None, callback=None):
    """Run (or resume) one training run; returns the result dict, or None when stopped at ``stop_at_step``.

    progress: show a tqdm bar (default cfg.progress). callback(step, loss, proportions) is called every step
    (compare uses it to report progress from worker processes). stop_at_step: save a checkpoint after that many
    steps and return, as a kill would (for tests and time slicing).

    Under torchrun (WORLD_SIZE > 1 in the environment) the process group is set up here (gloo for
    ``cfg.device == "cpu"``, NCCL for "cuda") unless the caller already made one, and every rank must call
    train with the same settings; every rank returns the same result, and only rank 0 writes files, shows the
    bar and calls ``callback``.
    """
    try:
        validate(cfg)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    with distributed.process_group_from_env(cfg.device) as device:
        return _train(cfg, device, resume, overwrite, stop_at_step, progress, callback)


def _train(cfg, device, resume, overwrite, stop_at_step, progress, callback):
    run = Run(cfg, device)
    main = distributed.is_main()
    checkpoint = prepare_output(cfg, resume, overwrite)
    # Rank 0's removals (--overwrite) are done before any rank goes on.
    distributed.barrier()
    if checkpoint is not None:
        try:
            state = load_checkpoint(checkpoint)
        except (OSError, RuntimeError, ValueError, EOFError) as exc:
            raise RunError(f"--resume: cannot read {checkpoint!r}: {exc}") from None
        run.load_state_dict(state, checkpoint)
    elif os.path.isfile(os.path.join(cfg.out, RESULT)):
        # A finished run: its result stands for this resume only if the same settings made it (compare --resume
        # with changed flags must not report the old numbers as new ones).
        path = os.path.join(cfg.out, RESULT)
        try:
            with open(path) as handle:
                result = json.load(handle)
            stored = result["settings"], result["corpus_fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"--resume: cannot read {path!r}: {exc}") from None
        run.check_same_run(*stored, path)
        return result
    os.makedirs(cfg.out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    show = (cfg.progress if progress is None else progress) and main
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=run.step, desc=f"{cfg.method} s{cfg.seed}", dynamic_ncols=True)
    try:
        _loop(run, stop_at_step, bar, callback if main else None)
    finally:
        if bar is not None:
            bar.close()
    if run.step < cfg.steps:
        return None
    return _finish(run)


def _evaluate(run, step, pending):
    """Per-group validation losses of the model after ``step`` steps, once per step whoever asks."""
    if step not in pending:
        pending.clear()
        pending[step] = run.val_evaluator(run.forward)
    return pending[step]


def _save(run):
    """Rank 0 writes the checkpoint (every rank holds the same state); the others wait until it is there."""
    if distributed.is_main():
        save_checkpoint(run.state_dict(), os.path.join(run.cfg.out, CHECKPOINT))
    distributed.barrier()


def _step_statistics(run, per_token, group_ids):
    """(global mean train loss, global drawn count per group) of the step that produced ``per_token``."""
    if run.world_size == 1:
        return float(per_token.detach().mean()), torch.bincount(group_ids, minlength=run.num_groups).tolist()
    # One all-reduce of 1 + K numbers: the loss sum and the drawn groups of every rank's slice. Every slice has
    # batch / world_size full-length windows, so the global token count is known without communication.
    local = torch.cat([per_token.detach().sum().to("cpu", torch.float64).reshape(1),
                       torch.bincount(group_ids.to("cpu"), minlength=run.num_groups).to(torch.float64)])
    total = distributed.all_reduce_sum(local)
    return float(total[0]) / per_token.numel() / run.world_size, total[1:].round().to(torch.int64).tolist()


def train_step(run, step, counts):
    """One optimizer step of ``run`` at ``step`` (its learning rate) on a batch drawn from ``run.sampler``.

    counts: int64 [m] samples per group, summing to ``cfg.batch`` (the global batch). Returns (per-token losses
    float32 [batch / world_size, context], group ids int64 [batch / world_size]) of this rank's slice.
    """
    cfg, model, optimizer = run.cfg, run.train_model, run.optimizer
    # Exact counts as weights: the systematic allocation then realises them slot for slot.
    sample_ids, group_ids = run.sampler.sample(cfg.batch, counts.to(torch.float64))
    inputs, targets, _ = run.train_windows.batch(sample_ids)
    if run.device.type != "cpu":
        inputs, targets, group_ids = (t.to(run.device, non_blocking=True) for t in (inputs, targets, group_ids))
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    hidden = model(inputs)
    per_token, _, _ = group_linear_cross_entropy(hidden, run.model.lm_head.weight, targets, group_ids,
                                                 run.num_groups)
    # The objective is the token mean over the global batch. Each rank's slice holds the same number of
    # tokens (batch / world_size full windows), so its own mean is world_size times its share of that
    # objective, and DDP's average over ranks gives exactly the gradient of the global mean.
    loss = per_token.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        # The gradients are already averaged, so this is the norm of the global batch's gradient.
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    optimizer.step()
    return per_token, group_ids


def _loop(run, stop_at_step, bar, callback):
    cfg, mixer, history = run.cfg, run.mixer, run.history
    run.train_model.train()
    cache = {}
    smoothed = None
    while run.step < cfg.steps:
        step = run.step
        if stop_at_step is not None and step >= stop_at_step:
            break
        if mixer.wants_eval(step):
            mixer.observe(step, _evaluate(run, step, cache))
        if step % cfg.eval_every == 0:
            history["val_curve"].append({"step": step, "losses": _evaluate(run, step, cache).tolist()})
        tick = time.perf_counter()
        counts = mixer.group_counts(step, cfg.batch)
        per_token, group_ids = train_step(run, step, counts)
        history["train_seconds"] += time.perf_counter() - tick
        value, drawn = _step_statistics(run, per_token, group_ids)
        history["train_loss"].append(value)
        history["group_counts"].append(drawn)
        run.step = step + 1
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if bar is not None:
            bar.update(1)
            if run.step % 10 == 0 or run.step == cfg.steps:
                p = counts.double() / cfg.batch
                bar.set_postfix_str(f"loss {smoothed:.3f} p [{' '.join(f'{x:.2f}' for x in p.tolist())}]")
        if callback is not None:
            callback(run.step, value, counts.tolist())
        if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            _save(run)
    if run.step < cfg.steps:
        _save(run)


def _finish(run):
    cfg, history = run.cfg, run.history
    final_val = run.val_evaluator(run.forward)
    if not history["val_curve"] or history["val_curve"][-1]["step"] != cfg.steps:
        history["val_curve"].append({"step": cfg.steps, "losses": final_val.tolist()})
    test_evaluator = run._evaluator(run.test_windows, cfg.test_windows)
    test_loss = test_evaluator(run.forward)
    test_ppl = [math.exp(x) for x in test_loss.tolist()]
    drawn = torch.tensor(history["group_counts"], dtype=torch.float64).sum(0)
    mixing_log = run.mixer.log.to_dict()
    result = {
        "method": cfg.method, "seed": cfg.seed, "groups": run.groups, "steps": cfg.steps,
        "settings": cfg.to_dict(), "mixer_config": _jsonable(run.mixer.config()),
        "parameters": run.model.num_parameters(),
        "test_loss": test_loss.tolist(), "test_ppl": test_ppl, "avg_test_ppl": sum(test_ppl) / len(test_ppl),
        "final_val_loss": final_val.tolist(), "final_val_ppl": [math.exp(x) for x in final_val.tolist()],
        "avg_val_ppl": sum(math.exp(x) for x in final_val.tolist()) / run.num_groups,
        "drawn_share": (drawn / drawn.sum()).tolist(), "drawn_counts": history["group_counts"],
        "train_loss": history["train_loss"], "val_curve": history["val_curve"],
        "proportions": run.mixer.log.proportions_per_step(cfg.steps).tolist(),
        "mixing_log": {"phases": mixing_log["phases"], "estimates": mixing_log["estimates"]},
        "evaluations": len(run.mixer.log.evaluations), "train_seconds": round(history["train_seconds"], 2),
        "test_windows": [int(n) for n in test_evaluator.tokens_per_group // cfg.context],
        "torch": torch.__version__, "machine": platform.machine(),
        "corpus_fingerprint": run.store.manifest.get("fingerprint"),
    }
    if distributed.is_main():
        write_json_atomic(result, os.path.join(cfg.out, RESULT))
        try:
            from .plots import plot_run
            plot_run(result, os.path.join(cfg.out, "run.png"))
        except ImportError:
            pass
        checkpoint = os.path.join(cfg.out, CHECKPOINT)
        if os.path.isfile(checkpoint):
            os.remove(checkpoint)
    # When train returns on any rank, the result is on disk.
    distributed.barrier()
    return result


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
