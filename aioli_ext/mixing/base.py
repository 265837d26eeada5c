"""The mixer protocol: a small state machine driven by the optimizer-step counter.

Steps count optimizer steps (the micro-batches of gradient accumulation belong to one step and share its
proportions). ``step`` always names a model state: the model after ``step`` optimizer steps, i.e. just before
optimizer step ``step`` (0-based) runs. The training loop is::

    for step in range(start_step, total_steps):
        if mixer.wants_eval(step):                 # model has taken `step` steps
            mixer.observe(step, evaluator(model))  # per-group mean losses, float [m]
        p = mixer.proportions(step)                # float64 [m], same for every micro-batch of this step
        ...draw the step's batches with p (or mixer.group_counts(step, global_batch)), train, optimizer.step()

An evaluation thus comes before the step it informs, the very first one (step 0, before any training) needs no
special case, and a round's closing evaluation is the next round's opening one (one evaluation per model
state, never two). Misuse raises :class:`MixerProtocolError`: asking for proportions past an evaluation that
was not observed, skipping an evaluation, observing at a step where none is due, or going back in steps
(resume goes through ``load_state_dict``).
"""

import torch

from .allocation import phase_group_counts
from .checks import FLOAT, MixerProtocolError, MixerSettingsMismatch, as_losses, check_int, check_step
from .log import MixingLog

STATE_VERSION = 1
DEFAULT_BLOCK_STEPS = 64


class Phase:
    """A stretch of steps on one mixture.

    Attributes:
        start: first step (int).
        stop: one past the last step (int), or None when the phase lasts until further notice.
        proportions: float64 [m] mixture, summing to 1.
        label: what the phase is for: "prior", "learn_params", "mix", "static", "await" (waiting for the
            first evaluation; it has no steps).
        group: the hot group of a LearnParams sub-phase, else None.
    """

    __slots__ = ("start", "stop", "proportions", "label", "group")

    def __init__(self, start, stop, proportions, label, group=None):
        self.start = int(start)
        self.stop = None if stop is None else int(stop)
        self.proportions = torch.as_tensor(proportions, dtype=FLOAT).clone()
        self.label = str(label)
        self.group = None if group is None else int(group)

    @property
    def num_steps(self):
        """Steps in the phase (None when open-ended)."""
        return None if self.stop is None else self.stop - self.start

    def copy(self):
        return Phase(self.start, self.stop, self.proportions, self.label, self.group)

    def to_state(self):
        return {"start": self.start, "stop": self.stop, "proportions": self.proportions.clone(),
                "label": self.label, "group": self.group}

    @classmethod
    def from_state(cls, state):
        return cls(state["start"], state["stop"], state["proportions"], state["label"], state["group"])

    def __repr__(self):
        props = ", ".join(f"{value:.4f}" for value in self.proportions.tolist())
        group = "" if self.group is None else f", group={self.group}"
        return f"Phase(steps {self.start}..{'' if self.stop is None else self.stop}, {self.label}{group}, p=[{props}])"


def _config_equal(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and bool(torch.equal(a.to(FLOAT), b.to(FLOAT)))
    return a == b


def _config_copy(config):
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in config.items()}


class Mixer:
    """Base class of every mixer: the protocol, the schedule bookkeeping, the log and the state_dict.

    A subclass sets its first phase with :meth:`_set_phase` in ``__init__``, implements :meth:`_on_observe`
    (called with validated float64 [m] losses at the due step; it must set the next phase), and
    :meth:`_extra_state` / :meth:`_load_extra_state` for its own state. ``self._config`` holds the constructor
    arguments (normalised) so that ``type(mixer)(**config)`` rebuilds an equivalent mixer.

    Attributes:
        num_groups: m.
        log: :class:`MixingLog` of phases, evaluations and estimates.
    """

    method = "mixer"
    # Settings added after states were saved: {setting: the value that older states behaved as}.
    config_added = {}

    def __init__(self, num_groups, *, min_groups=1):
        self.num_groups = check_int(num_groups, "num_groups", minimum=min_groups)
        self.log = MixingLog(self.num_groups)
        self._phase = None
        self._eval_due = None
        self._config = {"num_groups": self.num_groups}
        self._count_cache = {}

    # ---- protocol -------------------------------------------------------------------------------------------
    @property
    def next_eval_step(self):
        """The step at which the next evaluation is due (int), or None when no evaluation is scheduled."""
        return self._eval_due

    def wants_eval(self, step):
        """True when an evaluation of the model after ``step`` optimizer steps is due now.

        Raises MixerProtocolError when ``step`` is past a due evaluation that was never observed.
        """
        step = check_step(step)
        if self._eval_due is None or step < self._eval_due:
            return False
        if step > self._eval_due:
            raise MixerProtocolError(
                f"{self.method}: an evaluation was due at step {self._eval_due} and was skipped (asked at step "
                f"{step}); call observe({self._eval_due}, losses) with the model after {self._eval_due} steps")
        return True

    def phase(self, step):
        """The :class:`Phase` (a copy) that holds ``step``; raises MixerProtocolError when ``step`` is before the
        current phase or at/after an evaluation that has not been observed yet."""
        step = check_step(step)
        if self._eval_due is not None and step >= self._eval_due:
            raise MixerProtocolError(
                f"{self.method}: an evaluation is due at step {self._eval_due} and has not been observed; call "
                f"observe({self._eval_due}, losses) before asking for step {step}")
        if step < self._phase.start:
            raise MixerProtocolError(
                f"{self.method}: step {step} is before the current phase (steps {self._phase.start}.."
                f"{'' if self._phase.stop is None else self._phase.stop}); a mixer only moves forward, to go "
                f"back load a state_dict saved at that step")
        return self._phase.copy()

    def proportions(self, step):
        """The mixture to train optimizer step ``step`` on: float64 [m] on the CPU, summing to 1.

        Every micro-batch of the step uses the same proportions; calling it again for the same step returns the
        same values.
        """
        return self.phase(step).proportions

    def group_counts(self, step, batch_size, *, block_steps=DEFAULT_BLOCK_STEPS):
        """Exact per-group sample counts for step ``step`` (int64 [m], summing to ``batch_size``).

        The current phase's mixture is realised over the whole phase (or, for a phase without a known end, over
        consecutive blocks of ``block_steps`` steps from its start) by :func:`phase_group_counts`, so short
        LearnParams sub-phases hold their smoothed one-hot mixture to within one sample per group.
        ``batch_size`` is the global batch of one optimizer step (micro-batches and ranks together).
        """
        phase = self.phase(step)
        batch_size = check_int(batch_size, "batch_size", minimum=1)
        block_steps = check_int(block_steps, "block_steps", minimum=1)
        if phase.stop is not None:
            block_start, block_len = phase.start, phase.stop - phase.start
        else:
            block_start = phase.start + (step - phase.start) // block_steps * block_steps
            block_len = block_steps
        key = (block_start, block_len, batch_size, tuple(phase.proportions.tolist()))
        table = self._count_cache.get(key)
        if table is None:
            if len(self._count_cache) >= 4:
                self._count_cache.clear()
            table = phase_group_counts(phase.proportions, block_len, batch_size)
            self._count_cache[key] = table
        return table[step - block_start].clone()

    def observe(self, step, losses):
        """Take the per-group validation losses of the model after ``step`` optimizer steps.

        Args:
            step: must equal :attr:`next_eval_step`.
            losses: [m] per-group mean losses (any real dtype, any device); NaN or infinite values are rejected.
        """
        step = check_step(step)
        if self._eval_due is None:
            raise MixerProtocolError(f"{self.method}: no evaluation is due (observed at step {step}); this mixer "
                                     f"has no evaluation scheduled")
        if step != self._eval_due:
            raise MixerProtocolError(f"{self.method}: no evaluation is due at step {step}; the next one is due at "
                                     f"step {self._eval_due}")
        losses = as_losses(losses, self.num_groups)
        self.log.record_evaluation(step, losses)
        self._on_observe(step, losses)

    # ---- state ----------------------------------------------------------------------------------------------
    def config(self):
        """The settings (constructor arguments, normalised); ``type(mixer)(**mixer.config())`` rebuilds it."""
        return _config_copy(self._config)

    def state_dict(self):
        """Everything needed to resume exactly: settings, position in the schedule, method state (including RNG),
        and the log. Values are tensors, numbers, strings, lists and dicts (``torch.save`` friendly)."""
        return {"method": self.method, "version": STATE_VERSION, "config": self.config(),
                "phase": self._phase.to_state(), "eval_due": self._eval_due, "log": self.log.to_dict(),
                "state": self._extra_state()}

    def load_state_dict(self, state):
        """Restore a state saved by :meth:`state_dict` of a mixer with the same method and settings."""
        if not isinstance(state, dict) or "method" not in state:
            raise ValueError("state must be a dict produced by Mixer.state_dict()")
        if state["method"] != self.method:
            raise ValueError(f"state was saved by a {state['method']!r} mixer, this mixer is {self.method!r}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state has version {state.get('version')!r}, this code reads version {STATE_VERSION}")
        # A state saved before a setting existed behaved as config_added says.
        saved = {**self.config_added, **state["config"]}
        differing = sorted(key for key in set(saved) | set(self._config)
                           if key not in saved or key not in self._config
                           or not _config_equal(saved[key], self._config[key]))
        if differing:
            details = ", ".join(f"{key}: saved {saved.get(key)!r} vs {self._config.get(key)!r}" for key in differing)
            raise MixerSettingsMismatch(f"state was saved with different {self.method} settings ({details})",
                                        {key: (saved.get(key), self._config.get(key)) for key in differing})
        self._phase = Phase.from_state(state["phase"])
        self._eval_due = None if state["eval_due"] is None else int(state["eval_due"])
        self.log.load_dict(state["log"])
        self._load_extra_state(state["state"])
        self._count_cache.clear()

    # ---- hooks for subclasses -------------------------------------------------------------------------------
    def _set_phase(self, start, stop, proportions, label, *, group=None, eval_due=None, record=True):
        """Enter a new phase. ``eval_due`` is the step of the evaluation that ends it (usually ``stop``)."""
        self._phase = Phase(start, stop, proportions, label, group)
        self._eval_due = eval_due
        if record and (stop is None or stop > start):
            extra = {} if group is None else {"group": int(group)}
            self.log.record_phase(start, stop, self._phase.proportions, label, **extra)

    def _on_observe(self, step, losses):
        raise MixerProtocolError(f"{self.method}: this mixer takes no evaluations")

    def _extra_state(self):
        return {}

    def _load_extra_state(self, state):
        pass

    def __repr__(self):
        settings = ", ".join(f"{key}={'<tensor>' if isinstance(value, torch.Tensor) else value}"
                             for key, value in self._config.items())
        return f"{type(self).__name__}({settings})"


def uniform(num_groups):
    """The uniform mixture, float64 [m]."""
    return torch.full((num_groups,), 1.0 / num_groups, dtype=FLOAT)


