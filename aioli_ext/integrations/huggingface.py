"""Online data mixing inside a Hugging Face ``transformers.Trainer``.

:class:`MixingCallback` holds a mixer, a per-group evaluator and a :class:`~aioli_ext.sampler.MixtureSampler`
over the training dataset's index (group g owns the sample ids [offsets[g], offsets[g + 1])).
:class:`MixingTrainer` (or :class:`MixingTrainerMixin` in front of any ``Trainer`` subclass) lets it choose the
batches::

    mixing = MixingCallback(mixer, evaluator, group_sizes=[n_code, n_web], group_names=["code", "web"])
    trainer = MixingTrainer(model=model, args=args, train_dataset=dataset, callbacks=[mixing])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

When optimizer step ``s`` begins (the model has taken ``s`` steps) the callback runs the mixer protocol of
:mod:`aioli_ext.mixing.base` -- evaluate if the mixer wants it, then ``mixer.group_counts(s, global_batch)`` --
and draws the step's whole global batch (per-device batch × gradient accumulation × world size) in one
systematic draw that realises those counts exactly; this process's slice is cut into the step's micro-batches.
There is no lag: every micro-batch of step ``s`` follows the proportions the mixer chose for step ``s`` after
seeing the model of step ``s``. A DataLoader cannot give that -- accelerate reads one batch ahead and workers
read more, so a step's first batches would be drawn before the previous step has trained -- so the Trainer
iterates a DataLoader of step ticks (for its step and epoch bookkeeping) and the batches are read from
``train_dataset`` in the main process when their step begins. Keep ``train_dataset[i]`` cheap (pre-tokenised
data, e.g. :meth:`aioli_ext.data.TokenStore.windows`).

Distributed (DDP): every rank draws the same global batch and keeps its disjoint slice (rank =
``args.process_index``); the evaluator all-reduces its statistics, so every rank's mixer sees the same losses
and takes the same decisions without any broadcast.

Checkpoints: each ``checkpoint-N`` folder the Trainer writes gets ``aioli_mixing.pt`` (mixer state with its log
and RNG, sampler cursors, step); ``trainer.train(resume_from_checkpoint=...)`` restores it, so a resumed run
draws the same samples and takes the same mixing decisions as an uninterrupted one.
"""
import inspect
import os

import torch

from ..mixing import GroupEvaluator, Mixer
from ..sampler import MixtureSampler
from ..train.checkpoint import load_checkpoint, save_checkpoint

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("aioli_ext.integrations.huggingface needs transformers (and accelerate): "
                      "pip install 'aioli_ext[hf]'") from exc

__all__ = ["MIXING_STATE_FILE", "MixingCallback", "MixingTrainer", "MixingTrainerMixin"]

MIXING_STATE_FILE = "aioli_mixing.pt"
_STATE_FORMAT = "aioli_ext-hf-mixing"
_STATE_VERSION = 1


def _single_item(items):
    return items[0]


class _StepTicks(torch.utils.data.DataLoader):
    """The DataLoader the Trainer iterates: one tick per micro-batch; the batches themselves are drawn at the
    start of each optimizer step by :meth:`MixingTrainerMixin.get_batch_samples`."""

    def __init__(self, num_ticks):
        super().__init__(range(num_ticks), batch_size=1, collate_fn=_single_item)


class MixingCallback(TrainerCallback):
    """Drives a mixer and a :class:`MixtureSampler` inside a :class:`MixingTrainer`.

    Args:
        mixer: any :class:`aioli_ext.mixing.Mixer` (Aioli, Stratified, Static, SkillIt, DoReMi), at step 0 or
            loaded by a resume.
        evaluator: a :class:`aioli_ext.mixing.GroupEvaluator` (its ``device`` is set to the training device when
            it is None), or any callable ``evaluator(model) -> [K]`` per-group mean validation losses. It is
            called on every rank (it must all-reduce under torch.distributed, as GroupEvaluator does).
        group_sizes: K training-set group sizes; group g owns dataset indices [sum(sizes[:g]),
            sum(sizes[:g + 1])). A sampler is then built with this process's rank and world size.
        sampler: instead of ``group_sizes``, a ready MixtureSampler (e.g. ``MixtureSampler.from_csr``) whose
            rank and world size match the TrainingArguments'.
        seed, mode, device: for the sampler built from ``group_sizes``. ``mode="systematic"`` realises the
            mixer's per-step group counts exactly; ``"iid"`` draws each slot independently.
        group_names: K names for the logged values (default "0", "1", ...).

    Attributes:
        step: the next optimizer step whose batches will be drawn (= optimizer steps taken).
        last_proportions: float64 [K], the mixer's proportions of the last step drawn.
        last_counts: int64 [K], the global per-group counts requested for that step.
    """

    def __init__(self, mixer, evaluator, group_sizes=None, *, sampler=None, seed=0, mode="systematic",
                 device="cpu", group_names=None):
        if not isinstance(mixer, Mixer):
            raise TypeError(f"mixer must be an aioli_ext.mixing.Mixer, got {type(mixer).__name__}")
        if not callable(evaluator):
            raise TypeError(f"evaluator must be a GroupEvaluator or a callable evaluator(model) -> [K] losses, got "
                            f"{type(evaluator).__name__}")
        if (group_sizes is None) == (sampler is None):
            raise ValueError("give exactly one of group_sizes and sampler")
        if sampler is not None and not isinstance(sampler, MixtureSampler):
            raise TypeError(f"sampler must be an aioli_ext.MixtureSampler, got {type(sampler).__name__}")
        num_groups = sampler.num_groups if sampler is not None else len(group_sizes)
        if num_groups != mixer.num_groups:
            raise ValueError(f"the training index has {num_groups} groups but the mixer has {mixer.num_groups}")
        if isinstance(evaluator, GroupEvaluator) and evaluator.num_groups != mixer.num_groups:
            raise ValueError(f"evaluator has {evaluator.num_groups} groups but the mixer has {mixer.num_groups}")
        if group_names is None:
            group_names = [str(g) for g in range(num_groups)]
        group_names = [str(name) for name in group_names]
        if len(group_names) != num_groups:
            raise ValueError(f"group_names must have one name per group (K={num_groups}), got {len(group_names)}")
        self.mixer = mixer
        self.evaluator = evaluator
        self.group_names = group_names
        self.sampler = sampler
        self._sampler_settings = None if group_sizes is None else (list(group_sizes), seed, mode, device)
        self.step = 0
        self.global_batch = None
        self.micro_batches = None
        self.last_proportions = None
        self.last_counts = None
        self._max_steps = None

    # ---- set-up ---------------------------------------------------------------------------------------------
    def bind(self, args):
        """Read the batch geometry from TrainingArguments and build the sampler for this rank (the Trainer calls
        this; a callback serves one Trainer)."""
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(f"args.max_steps must be > 0 with a MixingTrainer (a mixture stream has no epochs), "
                             f"got {args.max_steps}")
        if args.auto_find_batch_size:
            raise ValueError("args.auto_find_batch_size must be False with a MixingTrainer: the global batch "
                             "fixes the mixer's per-step counts and the sampler stream")
        self.micro_batches = int(args.gradient_accumulation_steps)
        self.global_batch = int(args.train_batch_size) * self.micro_batches * int(args.world_size)
        self._max_steps = int(args.max_steps)
        rank, world_size = int(args.process_index), int(args.world_size)
        if self.sampler is None:
            sizes, seed, mode, device = self._sampler_settings
            self.sampler = MixtureSampler(sizes, seed=seed, mode=mode, device=device, rank=rank,
                                          world_size=world_size)
        elif (self.sampler.rank, self.sampler.world_size) != (rank, world_size):
            raise ValueError(f"sampler has rank {self.sampler.rank} of {self.sampler.world_size} but this process "
                             f"is rank {rank} of {world_size} (args.process_index, args.world_size)")
        if isinstance(self.evaluator, GroupEvaluator) and self.evaluator.device is None:
            self.evaluator.device = args.device

    def step_ticks(self):
        """The DataLoader the Trainer iterates: max_steps × gradient-accumulation ticks (one epoch)."""
        return _StepTicks(self._max_steps * self.micro_batches)

    # ---- the mixer protocol, once per optimizer step ---------------------------------------------------------
    def draw_step(self, model, step, micro_batches):
        """Evaluate if the mixer wants it, then draw optimizer step ``step``'s global batch.

        Returns ``micro_batches`` lists of this rank's dataset indices (``global_batch / (world_size ×
        micro_batches)`` each).
        """
        if step != self.step:
            raise RuntimeError(f"batches for step {step} were asked but the mixing state is at step {self.step}; "
                               f"resume through MixingTrainer.train(resume_from_checkpoint=...)")
        if micro_batches != self.micro_batches:
            raise RuntimeError(f"step {step} has {micro_batches} micro-batches, expected {self.micro_batches}")
        if self.mixer.wants_eval(step):
            self.mixer.observe(step, self.evaluator(model))
        counts = self.mixer.group_counts(step, self.global_batch)
        sample_ids, _ = self.sampler.sample(self.global_batch, counts.to(torch.float64))
        self.last_proportions = self.mixer.proportions(step)
        self.last_counts = counts
        self.step = step + 1
        return [chunk.tolist() for chunk in sample_ids.cpu().chunk(micro_batches)]

    def log_entries(self):
        """Values to add to the Trainer's training logs: the proportions of the last step drawn and the last
        per-group validation losses the mixer observed."""
        entries = {}
        if self.last_proportions is not None:
            for name, value in zip(self.group_names, self.last_proportions.tolist()):
                entries[f"mixing/p_{name}"] = value
        if self.mixer.log.evaluations:
            last = self.mixer.log.evaluations[-1]
            for name, value in zip(self.group_names, last["losses"]):
                entries[f"mixing/val_loss_{name}"] = value
        return entries

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self):
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "step": self.step,
                "global_batch": self.global_batch, "mixer": self.mixer.state_dict(),
                "sampler": self.sampler.state_dict(), "last_proportions": self.last_proportions,
                "last_counts": self.last_counts}

    def load_state_dict(self, state):
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state must come from MixingCallback.state_dict() (format {_STATE_FORMAT!r}, "
                             f"version {_STATE_VERSION}), got {state.get('format')!r} {state.get('version')!r}")
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"state was saved with a global batch of {state['global_batch']} samples per step, "
                             f"this run has {self.global_batch} (per-device batch × gradient accumulation × "
                             f"world size)")
        self.mixer.load_state_dict(state["mixer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.last_proportions = state["last_proportions"]
        self.last_counts = state["last_counts"]

    def load_checkpoint(self, folder):
        """Restore the state saved in a Trainer checkpoint folder."""
        path = os.path.join(folder, MIXING_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from_checkpoint: {folder!r} has no {MIXING_STATE_FILE} (it was not "
                                    f"written by a MixingTrainer)")
        self.load_state_dict(load_checkpoint(path))

    # ---- Trainer events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not isinstance(train_dataloader, _StepTicks):
            raise TypeError("MixingCallback draws the batches itself: train with MixingTrainer, or put "
                            "MixingTrainerMixin first in your Trainer subclass's bases")
        if state.global_step != self.step:
            raise ValueError(f"the Trainer starts at global step {state.global_step} but the mixing state is at "
                             f"step {self.step}; resume with MixingTrainer.train(resume_from_checkpoint=...) and "
                             f"use a fresh mixer for a new run")

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the Trainer saved step {state.global_step} but {folder!r} does not exist; "
                                    f"MixingCallback writes {MIXING_STATE_FILE} into args.output_dir's checkpoint "
                                    f"folders")
        save_checkpoint(self.state_dict(), os.path.join(folder, MIXING_STATE_FILE))


_BATCH_HOOK = "get_batch_samples"
_BATCH_HOOK_PARAMETERS = ("epoch_iterator", "num_batches", "device")


def _check_batch_hook(cls):
    """The mixin draws each step's batches in ``Trainer.get_batch_samples``, which transformers does not document
    (the Trainer calls it once per optimizer step with these parameters; tested with transformers 5.24). Fail when
    the trainer is built, naming what was found, rather than mid-run if a transformers release reshapes it."""
    mro = cls.__mro__
    hook = next((vars(base)[_BATCH_HOOK] for base in mro[mro.index(MixingTrainerMixin) + 1:]
                 if _BATCH_HOOK in vars(base)), None)
    found = tuple(inspect.signature(hook).parameters)[1:] if callable(hook) else None
    if found != _BATCH_HOOK_PARAMETERS:
        import transformers
        has = "no such method" if found is None else f"{_BATCH_HOOK}({', '.join(found)})"
        raise TypeError(f"MixingTrainer draws each step's batches in Trainer.{_BATCH_HOOK}"
                        f"({', '.join(_BATCH_HOOK_PARAMETERS)}), an undocumented transformers method; "
                        f"{cls.__name__} under transformers {transformers.__version__} has {has}")


class MixingTrainerMixin:
    """Put first in the bases of a ``transformers.Trainer`` subclass; needs exactly one :class:`MixingCallback`
    in ``callbacks``. Overrides ``get_train_dataloader`` (step ticks), ``get_batch_samples`` (draws each
    optimizer step's batches when the step begins), ``log`` (adds the proportions) and ``train`` (restores the
    mixing state on resume)."""

    def __init__(self, *args, **kwargs):
        _check_batch_hook(type(self))
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, MixingCallback)]
        if len(found) != 1:
            raise ValueError(f"callbacks must hold exactly one MixingCallback, got {len(found)}")
        self.mixing = found[0]
        self.mixing.bind(self.args)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self.mixing.step_ticks()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        ticks = 0
        for _ in range(num_batches):
            try:
                next(epoch_iterator)
            except StopIteration:
                break
            ticks += 1
        batches = []
        if ticks:
            remove_columns = getattr(self, "_get_collator_with_removed_columns", None)
            collate = self.data_collator if remove_columns is None else remove_columns(self.data_collator,
                                                                                     description="training")
            for ids in self.mixing.draw_step(self.model_wrapped, self.state.global_step, ticks):
                batches.append(collate([self.train_dataset[i] for i in ids]))
        return super().get_batch_samples(iter(batches), len(batches), device)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self.mixing.log_entries())
        return super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.mixing.load_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)


class MixingTrainer(MixingTrainerMixin, Trainer):
    """``transformers.Trainer`` whose batches follow a :class:`MixingCallback`'s mixer (see the module doc)."""
