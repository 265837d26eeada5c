"""The baselines Aioli unifies, as LMO parameterisations over the same core (AIOLI.md §1):

- :class:`Stratified`: p = uniform.
- :class:`Static`: p = given proportions (also what grid search and a fitted static law produce).
- :class:`SkillIt`: A^t_ij = L_i^t · S_ij with a skills graph S; EG from uniform over a look-back window.
- :class:`DoReMi`: A^t = diag(max(L^t − L_ref, 0)); EG with step μ on the carried weights, mixed with uniform.

The online baselines evaluate at the start of every round (step r·U) and train the round on the mixture that
evaluation gives, so round 0 already uses the initial model's losses.
"""
import torch

from .base import Mixer, uniform
from .checks import (FLOAT, as_float_tensor, as_proportions, check_float, check_int, check_optional_int,
                     to_tensor)
from .lmo import eg_gradient, exponentiated_gradient_step, mix_with_uniform


class Static(Mixer):
    """A fixed mixture for every step; takes no evaluations.

    Args:
        num_groups: m.
        proportions: [m] non-negative weights with a positive sum (normalised to sum 1).
    """

    method = "static"

    def __init__(self, num_groups, proportions):
        super().__init__(num_groups)
        proportions = as_proportions(proportions, self.num_groups, "proportions")
        self._config["proportions"] = proportions
        self._set_phase(0, None, proportions, "static")


class Stratified(Mixer):
    """The uniform mixture p_j = 1/m for every step; takes no evaluations."""

    method = "stratified"

    def __init__(self, num_groups):
        super().__init__(num_groups)
        self._set_phase(0, None, uniform(self.num_groups), "static")


class RoundMixer(Mixer):
    """Base of the online baselines: an evaluation at the start of each round of ``update_steps`` steps, and
    the round trains on the mixture :meth:`_update` computes from it.

    Args:
        num_groups: m.
        update_steps: U, steps per round.
        rounds: number of rounds (the last mixture is kept afterwards); None: no limit.
        total_steps: length of the run if known: sets ``rounds`` to ceil(total_steps / U) when None, so no
            evaluation is requested at or after the end of the run.
    """

    def __init__(self, num_groups, *, update_steps, rounds=None, total_steps=None):
        super().__init__(num_groups)
        self.update_steps = check_int(update_steps, "update_steps", minimum=1)
        rounds = check_optional_int(rounds, "rounds", minimum=1)
        total_steps = check_optional_int(total_steps, "total_steps", minimum=1)
        if total_steps is not None:
            needed = -(-total_steps // self.update_steps)
            if rounds is None:
                rounds = needed
            elif rounds > needed:
                raise ValueError(f"steps do not fit: rounds = {rounds} rounds of update_steps = {self.update_steps} "
                                 f"start after total_steps = {total_steps} (at most {needed} rounds)")
        self.rounds, self.total_steps = rounds, total_steps
        self._round = -1
        self._config.update(update_steps=self.update_steps, rounds=rounds, total_steps=total_steps)
        self._set_phase(0, 0, uniform(self.num_groups), "await", eval_due=0)

    @property
    def current_round(self):
        return self._round

    def _on_observe(self, step, losses):
        self._round += 1
        proportions = self._update(step, losses)
        last_round = self.rounds is not None and self._round + 1 >= self.rounds
        stop = None if last_round else step + self.update_steps
        self._set_phase(step, stop, proportions, "mix", eval_due=stop)

    def _update(self, step, losses):
        """The round's new proportions (float64 [m]) from the losses observed at ``step``; each subclass defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define _update(step, losses)")

    def _extra_state(self):
        return {"round": self._round}

    def _load_extra_state(self, state):
        self._round = int(state["round"])


class SkillIt(RoundMixer):
    """Skill-It's online mixture: p^t ∝ exp(η Σ_{τ in window} Σ_i L_i^τ S_ij), from uniform.

    In LMO terms A^τ_ij = L_i^τ · S_ij (row = evaluated, column = trained) and the EG step starts from uniform
    every round, summing the gradients of the last ``window`` evaluations.

    Args:
        num_groups: m.
        skills_graph: S float [m, m]; S_ij = relative loss drop of group i after training on group j alone
            (see :func:`skills_graph_from_runs`).
        update_steps, rounds, total_steps: see :class:`RoundMixer`.
        eta: EG step size η > 0.
        window: number of most recent evaluations summed (>= 1); None sums all of them.
    """

    method = "skillit"

    def __init__(self, num_groups, *, skills_graph, update_steps, eta=0.5, window=3, rounds=None,
                 total_steps=None):
        super().__init__(num_groups, update_steps=update_steps, rounds=rounds, total_steps=total_steps)
        m = self.num_groups
        self.skills_graph = as_float_tensor(skills_graph, "skills_graph", (m, m))
        self.eta = check_float(eta, "eta", low=0.0, low_open=True)
        self.window = check_optional_int(window, "window", minimum=1)
        self._config.update(skills_graph=self.skills_graph.clone(), eta=self.eta, window=self.window)
        self._gradients = []

    def interaction_at(self, losses):
        """A = diag(L)·S: float64 [m, m] for per-group losses L [m]."""
        return torch.as_tensor(losses, dtype=FLOAT)[:, None] * self.skills_graph

    def _update(self, step, losses):
        self._gradients.append(eg_gradient(self.interaction_at(losses)))
        if self.window is not None:
            self._gradients = self._gradients[-self.window:]
        else:
            # Without a window only the sum matters: keep it as one entry.
            self._gradients = [torch.stack(self._gradients).sum(0)]
        gradient = torch.stack(self._gradients).sum(0)
        proportions = exponentiated_gradient_step(uniform(self.num_groups), gradient, self.eta)
        self.log.record_estimate(self._round, step, interaction=self.interaction_at(losses),
                                 proportions=proportions)
        return proportions

    def _extra_state(self):
        return {**super()._extra_state(), "gradients": [g.clone() for g in self._gradients]}

    def _load_extra_state(self, state):
        super()._load_extra_state(state)
        self._gradients = [torch.as_tensor(g, dtype=FLOAT).clone() for g in state["gradients"]]


class DoReMi(RoundMixer):
    """Online DoReMi: excess loss against a reference model drives EG on the domain weights.

    Each round: λ = max(L − L_ref, 0) (A = diag(λ)); α ← (1 − c)·normalise(α·exp(μ λ)) + c/m; train on p = α.
    The carried α is the smoothed one (as in DoReMi), so every weight stays >= c/m. The running mean of α over
    updates (:attr:`average_proportions`) is DoReMi's output for a separate final run.

    Args:
        num_groups: m.
        reference_losses: L_ref float [m], the reference model's per-group losses on the same evaluation set.
        update_steps, rounds, total_steps: see :class:`RoundMixer` (update_steps = 1 updates every step).
        step_size: μ > 0.
        smoothing: c in [0, 1], the uniform share mixed in.
    """

    method = "doremi"

    def __init__(self, num_groups, *, reference_losses, update_steps, step_size=1.0, smoothing=1e-3, rounds=None,
                 total_steps=None):
        super().__init__(num_groups, update_steps=update_steps, rounds=rounds, total_steps=total_steps)
        self.reference_losses = as_float_tensor(reference_losses, "reference_losses", (self.num_groups,))
        self.step_size = check_float(step_size, "step_size", low=0.0, low_open=True)
        self.smoothing = check_float(smoothing, "smoothing", low=0.0, high=1.0)
        self._config.update(reference_losses=self.reference_losses.clone(), step_size=self.step_size,
                            smoothing=self.smoothing)
        self._weights = uniform(self.num_groups)
        self._weight_sum = torch.zeros(self.num_groups, dtype=FLOAT)
        self._updates = 0

    @property
    def average_proportions(self):
        """Mean of the weights over all updates so far (float64 [m]); uniform before the first update."""
        if self._updates == 0:
            return uniform(self.num_groups)
        return self._weight_sum / self._updates

    def excess_losses(self, losses):
        """λ = max(L − L_ref, 0), float64 [m]."""
        return torch.clamp(torch.as_tensor(losses, dtype=FLOAT) - self.reference_losses, min=0.0)

    def _update(self, step, losses):
        interaction = torch.diag(self.excess_losses(losses))
        stepped = exponentiated_gradient_step(self._weights, eg_gradient(interaction), self.step_size)
        self._weights = mix_with_uniform(stepped, self.smoothing)
        self._weight_sum += self._weights
        self._updates += 1
        self.log.record_estimate(self._round, step, interaction=interaction, proportions=self._weights)
        return self._weights

    def _extra_state(self):
        return {**super()._extra_state(), "weights": self._weights.clone(), "weight_sum": self._weight_sum.clone(),
                "updates": self._updates}

    def _load_extra_state(self, state):
        super()._load_extra_state(state)
        self._weights = torch.as_tensor(state["weights"], dtype=FLOAT).clone()
        self._weight_sum = torch.as_tensor(state["weight_sum"], dtype=FLOAT).clone()
        self._updates = int(state["updates"])


def skills_graph_from_runs(initial_losses, losses_after):
    """Skill-It's graph from m short single-group runs that start from the same model.

    Args:
        initial_losses: L0 float [m], per-group losses of the starting model (all > 0).
        losses_after: float [m, m]; row j holds the per-group losses after the run that trained on group j only.
    Returns:
        S float64 [m, m] with S[i, j] = (L0_i − losses_after[j, i]) / L0_i (row = evaluated, column = trained);
        negative entries (training on j raised the loss of i) are kept.
    """
    initial = to_tensor(initial_losses)
    m = initial.numel()
    initial = as_float_tensor(initial, "initial_losses", (m,))
    if not bool((initial > 0).all()):
        raise ValueError(f"initial_losses must be > 0 (they divide the loss drops), got {initial.tolist()}")
    after = as_float_tensor(losses_after, "losses_after", (m, m))
    return (initial[:, None] - after.T) / initial[:, None]
