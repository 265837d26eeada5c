"""Aioli (AIOLI.md §2): estimate the interaction matrix A online with LearnParams, then take an EG step.

Schedule of round r (``update_steps`` = U steps, starting at step R = prior_steps + r·U):

    step R                  evaluation L0 (the previous round's closing evaluation: same model state)
    steps R + i·s .. +s     LearnParams sub-phase i = 0..k·m−1 on q^(order[i]), then an evaluation
    step R + k·m·s          A from the k·m loss drops; EG step on p
    steps R + k·m·s .. R+U  train on p
"""
import torch

from .base import Mixer, uniform
from .checks import FLOAT, as_proportions, check_bool, check_float, check_int, check_optional_int
from .lmo import (LP_BASES, OBJECTIVES, check_one_hot, eg_gradient, exponentiated_gradient_step, normalize_interaction,
                  objective_weights, smoothed_one_hot, unmix_smoothing)


class Aioli(Mixer):
    """Aioli with LearnParams, cumulative EG (or EMA), optional diagonal variant and restricted (prior) mode.

    Args:
        num_groups: m >= 2.
        update_steps: U, steps per round (LearnParams included).
        lp_sweeps: k, sweeps over the m groups per round (each sweep visits them in a fresh random order).
        lp_steps: s, training steps per LearnParams sub-phase.
        one_hot: mass of the hot group in each sub-phase's mixture, in (1/m, 1] (with the uniform base).
        lp_base: what the sub-phases perturb: ``"uniform"`` (the paper: q^(j) = (1 − c)/m + c·e_j) or
            ``"mixture"``, the round's current p (q^(j) = (1 − c)·p + c·e_j), with c = (m·one_hot − 1)/(m − 1)
            either way. Around uniform, the sub-phases pull the drawn data toward uniform for k·m·s steps of
            every round; around p they keep it near p, and A is measured where the EG step uses it.
        eta: EG step size η > 0.
        ema: None for cumulative EG p ← p·exp(η Σ_i A_ij); else γ in [0, 1): E ← (1−γ)·A + γ·E (E = A in the
            first round) and p ∝ p_start·exp(η Σ_i E_ij) from the starting proportions.
        normalize_A: shift A to a zero minimum when negative and scale it to sum 1 before the EG step.
        diagonal: estimate only A_ii = B_ii / one_hot.
        objective: what the EG step descends: ``"loss"`` = Σ_i L_i (the paper), or ``"perplexity"`` =
            Σ_i exp(L_i), the average per-group perplexity, whose gradient weighs group i's row of A by its
            current perplexity (groups with very different losses, e.g. a noise group next to code, then
            trade off the way an average-perplexity evaluation does).
        prior: restricted mode: proportions [m] to train on for ``prior_steps`` steps; the rounds then start
            from them. None: start from uniform.
        prior_steps: steps on ``prior`` before the first round (needs ``prior`` when > 0).
        rounds: number of rounds; after the last one the mixture is kept. None: no limit.
        total_steps: length of the run, if known: checks that the rounds fit, and sets ``rounds`` to the number
            of whole rounds that fit when ``rounds`` is None (a shorter tail keeps the last mixture instead of
            spending LearnParams steps whose result would never be used).
        seed: seed of the generator of the sweep orders (its state is part of the state_dict).

    Every LearnParams step is a real training step inside the round: k·m·s < U is required.

    State (in ``state_dict``): p float64 [m]; E float64 [m, m] or None; the round index; the round's sweep
    order int64 [k·m]; sub-phases done; the accumulated loss drops B float64 [m, m]; the last evaluated losses
    float64 [m]; the generator state; the last estimate of A.
    """

    method = "aioli"
    # Settings added after states were saved, with the value older states behaved as.
    config_added = {"lp_base": "uniform"}

    def __init__(self, num_groups, *, update_steps, lp_sweeps=4, lp_steps=4, one_hot=0.625, lp_base="uniform",
                 eta=0.2, ema=None, normalize_A=True, diagonal=False, objective="loss", prior=None, prior_steps=0,
                 rounds=None, total_steps=None, seed=0):
        super().__init__(num_groups, min_groups=2)
        m = self.num_groups
        update_steps = check_int(update_steps, "update_steps", minimum=1)
        lp_sweeps = check_int(lp_sweeps, "lp_sweeps", minimum=1)
        lp_steps = check_int(lp_steps, "lp_steps", minimum=1)
        one_hot = check_one_hot(one_hot, m)
        if lp_base not in LP_BASES:
            raise ValueError(f"lp_base must be one of {list(LP_BASES)}, got {lp_base!r}")
        eta = check_float(eta, "eta", low=0.0, low_open=True)
        ema = None if ema is None else check_float(ema, "ema", low=0.0, high=1.0, high_open=True)
        normalize_A = check_bool(normalize_A, "normalize_A")
        diagonal = check_bool(diagonal, "diagonal")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        prior_steps = check_int(prior_steps, "prior_steps", minimum=0)
        rounds = check_optional_int(rounds, "rounds", minimum=1)
        total_steps = check_optional_int(total_steps, "total_steps", minimum=1)
        seed = check_int(seed, "seed", minimum=0)
        lp_total = lp_sweeps * m * lp_steps
        if lp_total >= update_steps:
            raise ValueError(
                f"LearnParams takes lp_sweeps*num_groups*lp_steps = {lp_sweeps}*{m}*{lp_steps} = {lp_total} steps, "
                f"which must be fewer than update_steps = {update_steps} so that each round also trains on the "
                f"learned mixture")
        if prior is not None:
            prior = as_proportions(prior, m, "prior")
        elif prior_steps > 0:
            raise ValueError(f"prior_steps = {prior_steps} needs prior proportions (prior=None)")
        if total_steps is not None:
            fitting = (total_steps - prior_steps) // update_steps
            if fitting < 1:
                raise ValueError(
                    f"steps do not fit: prior_steps + update_steps = {prior_steps} + {update_steps} exceeds "
                    f"total_steps = {total_steps} (not even one round)")
            if rounds is None:
                rounds = fitting
            elif rounds > fitting:
                raise ValueError(
                    f"steps do not fit: prior_steps + rounds*update_steps = {prior_steps} + {rounds}*{update_steps} "
                    f"= {prior_steps + rounds * update_steps} exceeds total_steps = {total_steps}")
        self.update_steps, self.lp_sweeps, self.lp_steps = update_steps, lp_sweeps, lp_steps
        self.one_hot, self.lp_base, self.eta, self.ema = one_hot, lp_base, eta, ema
        self.normalize_A, self.diagonal, self.objective = normalize_A, diagonal, objective
        self.prior, self.prior_steps, self.rounds, self.total_steps = prior, prior_steps, rounds, total_steps
        self.seed = seed
        self._config.update(update_steps=update_steps, lp_sweeps=lp_sweeps, lp_steps=lp_steps, one_hot=one_hot,
                            lp_base=lp_base, eta=eta, ema=ema, normalize_A=normalize_A, diagonal=diagonal,
                            objective=objective, prior=prior, prior_steps=prior_steps, rounds=rounds,
                            total_steps=total_steps, seed=seed)

        self._start = uniform(m) if prior is None else prior.clone()
        self._p = self._start.clone()
        self._ema_matrix = None
        self._round = -1
        self._order = torch.zeros(0, dtype=torch.int64)
        self._lp_done = 0
        self._measured = torch.zeros(m, m, dtype=FLOAT)
        self._last_losses = None
        self._interaction = None
        self._generator = torch.Generator().manual_seed(seed)
        if prior_steps > 0:
            self._set_phase(0, prior_steps, self._p, "prior", eval_due=prior_steps)
        else:
            self._set_phase(0, 0, self._p, "await", eval_due=0)

    @classmethod
    def for_run(cls, num_groups, *, total_steps, rounds, prior_steps=0, **settings):
        """Aioli whose ``rounds`` rounds split the steps after the prior evenly: U = (total − prior) // rounds."""
        total_steps = check_int(total_steps, "total_steps", minimum=1)
        rounds = check_int(rounds, "rounds", minimum=1)
        prior_steps = check_int(prior_steps, "prior_steps", minimum=0)
        update_steps = (total_steps - prior_steps) // rounds
        if update_steps < 1:
            raise ValueError(f"steps do not fit: total_steps - prior_steps = {total_steps - prior_steps} is fewer "
                             f"than rounds = {rounds}")
        return cls(num_groups, update_steps=update_steps, rounds=rounds, total_steps=total_steps,
                   prior_steps=prior_steps, **settings)

    # ---- read-only views ------------------------------------------------------------------------------------
    @property
    def learn_params_steps(self):
        """k·m·s: LearnParams steps per round."""
        return self.lp_sweeps * self.num_groups * self.lp_steps

    @property
    def current_round(self):
        """Index of the round in progress (−1 before the first one starts)."""
        return self._round

    @property
    def mixture(self):
        """The EG mixture p (float64 [m]) that the non-LearnParams steps train on."""
        return self._p.clone()

    @property
    def interaction(self):
        """The last estimated A (float64 [m, m], un-mixed and not normalised), or None before the first round."""
        return None if self._interaction is None else self._interaction.clone()

    def round_start(self, round_index):
        """First step of round ``round_index``."""
        return self.prior_steps + round_index * self.update_steps

    # ---- state machine --------------------------------------------------------------------------------------
    def _on_observe(self, step, losses):
        # No round yet (the order is empty) or the round's LearnParams are done: this evaluation opens a round.
        if self._lp_done == self._order.numel():
            self._begin_round(step, losses)
            return
        hot = int(self._order[self._lp_done])
        self._measured[:, hot] += self._last_losses - losses
        self._last_losses = losses
        self._lp_done += 1
        if self._lp_done < self._order.numel():
            self._enter_sub_phase()
        else:
            self._finish_learn_params(step)

    def _begin_round(self, step, losses):
        self._round += 1
        self._last_losses = losses
        self._measured = torch.zeros(self.num_groups, self.num_groups, dtype=FLOAT)
        self._lp_done = 0
        # A fresh order for every round, drawn from the one generator (never re-seeded).
        self._order = torch.cat([torch.randperm(self.num_groups, generator=self._generator)
                                 for _ in range(self.lp_sweeps)])
        self._enter_sub_phase()

    def _enter_sub_phase(self):
        hot = int(self._order[self._lp_done])
        start = self.round_start(self._round) + self._lp_done * self.lp_steps
        self._set_phase(start, start + self.lp_steps,
                        smoothed_one_hot(self.num_groups, hot, self.one_hot, self._lp_base_mixture()), "learn_params",
                        group=hot, eval_due=start + self.lp_steps)

    def _lp_base_mixture(self):
        # p changes only at the EG step after the last sub-phase, so every sub-phase of a round and the
        # un-mixing see the same base.
        return None if self.lp_base == "uniform" else self._p

    def _finish_learn_params(self, step):
        measured = self._measured / self.lp_sweeps
        interaction = unmix_smoothing(measured, self.one_hot, base=self._lp_base_mixture(), diagonal=self.diagonal)
        used = normalize_interaction(interaction) if self.normalize_A else interaction
        matrices = {"measured": measured, "interaction": interaction, "normalized": used}
        weights = objective_weights(self.objective, self._last_losses)
        if self.ema is None:
            self._p = exponentiated_gradient_step(self._p, eg_gradient(used, weights), self.eta)
        else:
            self._ema_matrix = used.clone() if self._ema_matrix is None else \
                (1.0 - self.ema) * used + self.ema * self._ema_matrix
            matrices["ema"] = self._ema_matrix
            self._p = exponentiated_gradient_step(self._start, eg_gradient(self._ema_matrix, weights), self.eta)
        self._interaction = interaction
        self.log.record_estimate(self._round, step, proportions=self._p, **matrices)
        last_round = self.rounds is not None and self._round + 1 >= self.rounds
        stop = None if last_round else self.round_start(self._round + 1)
        self._set_phase(step, stop, self._p, "mix", eval_due=stop)

    # ---- state ----------------------------------------------------------------------------------------------
    def _extra_state(self):
        def copy(tensor):
            return None if tensor is None else tensor.clone()
        return {"p": self._p.clone(), "ema_matrix": copy(self._ema_matrix), "round": self._round,
                "order": self._order.clone(), "lp_done": self._lp_done, "measured": self._measured.clone(),
                "last_losses": copy(self._last_losses), "interaction": copy(self._interaction),
                "generator": self._generator.get_state()}

    def _load_extra_state(self, state):
        def copy(tensor, dtype=FLOAT):
            return None if tensor is None else torch.as_tensor(tensor).to(dtype).clone()
        self._p = copy(state["p"])
        self._ema_matrix = copy(state["ema_matrix"])
        self._round = int(state["round"])
        self._order = copy(state["order"], torch.int64)
        self._lp_done = int(state["lp_done"])
        self._measured = copy(state["measured"])
        self._last_losses = copy(state["last_losses"])
        self._interaction = copy(state["interaction"])
        self._generator.set_state(state["generator"].clone())
