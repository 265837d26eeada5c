"""A simulated training run whose per-group losses follow the linear dynamic law with a known A.

It checks mixers without a model: LearnParams should recover the A it is given, and a mixer that follows the
law should end with lower losses than one that ignores it. :func:`run_mixer` is also the reference training
loop of the mixer protocol.
"""
import torch

from .checks import FLOAT, as_float_tensor, as_proportions, check_float, check_int, check_step, to_tensor


class LinearLawEnvironment:
    """Per-group losses driven one optimizer step at a time.

    One step on mixture p:  L ← L − A(step)·p + ε,  ε ~ N(0, train_noise²·I)  (training-batch noise).
    An evaluation returns   L + δ,                  δ ~ N(0, eval_noise²·I)   (validation noise).

    Args:
        initial_losses: float [m], L before any step.
        interaction: the per-step A float [m, m], or a callable ``step -> A`` (for an A that drifts).
        train_noise, eval_noise: standard deviations (>= 0).
        seed: seed of the environment's own generator (independent of any mixer).

    Attributes:
        step: optimizer steps taken (int).
        losses: the noise-free-of-evaluation losses L, float64 [m].
    """

    def __init__(self, initial_losses, interaction, *, train_noise=0.0, eval_noise=0.0, seed=0):
        initial = to_tensor(initial_losses)
        self.num_groups = initial.numel()
        self.losses = as_float_tensor(initial, "initial_losses", (self.num_groups,))
        if callable(interaction):
            self._interaction = interaction
        else:
            matrix = as_float_tensor(interaction, "interaction", (self.num_groups, self.num_groups))
            self._interaction = lambda step: matrix
        self.train_noise = check_float(train_noise, "train_noise", low=0.0)
        self.eval_noise = check_float(eval_noise, "eval_noise", low=0.0)
        self.step = 0
        self._generator = torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))

    def interaction(self, step):
        """A at ``step`` (float64 [m, m])."""
        return torch.as_tensor(self._interaction(check_step(step)), dtype=FLOAT)

    def train_step(self, proportions):
        """Take one optimizer step on ``proportions`` (float [m], normalised)."""
        proportions = as_proportions(proportions, self.num_groups)
        noise = torch.randn(self.num_groups, generator=self._generator, dtype=FLOAT) * self.train_noise
        self.losses = self.losses - self.interaction(self.step) @ proportions + noise
        self.step += 1

    def evaluate(self):
        """Observed per-group losses of the current state: float64 [m]."""
        noise = torch.randn(self.num_groups, generator=self._generator, dtype=FLOAT) * self.eval_noise
        return self.losses + noise

    def state_dict(self):
        return {"losses": self.losses.clone(), "step": self.step, "generator": self._generator.get_state()}

    def load_state_dict(self, state):
        self.losses = state["losses"].clone()
        self.step = int(state["step"])
        self._generator.set_state(state["generator"].clone())


def piecewise_interaction(matrices, *, round_steps, first_step=0):
    """A callable ``step -> A`` that holds ``matrices[r]`` (float [R, m, m]) during round r, i.e. steps
    [first_step + r·round_steps, first_step + (r + 1)·round_steps); the first and last matrices extend
    before and after."""
    matrices = torch.as_tensor(matrices, dtype=FLOAT)
    if matrices.dim() != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"matrices must be [R, m, m], got shape {tuple(matrices.shape)}")
    round_steps = check_int(round_steps, "round_steps", minimum=1)
    first_step = check_int(first_step, "first_step", minimum=0)

    def interaction(step):
        index = max(step - first_step, 0) // round_steps
        return matrices[min(index, matrices.shape[0] - 1)]

    return interaction


def run_mixer(mixer, environment, num_steps, *, batch_size=None, start_step=None):
    """Drive ``mixer`` through ``num_steps`` steps of ``environment`` with the protocol's training loop.

    With ``batch_size`` each step trains on the realised counts ``mixer.group_counts(step, batch_size) /
    batch_size`` instead of the proportions. Starts at the environment's current step (a resumed run) unless
    ``start_step`` is given. Returns the environment's final losses float64 [m].
    """
    step = environment.step if start_step is None else check_int(start_step, "start_step", minimum=0)
    for step in range(step, step + check_int(num_steps, "num_steps", minimum=0)):
        if mixer.wants_eval(step):
            mixer.observe(step, environment.evaluate())
        if batch_size is None:
            mixture = mixer.proportions(step)
        else:
            mixture = mixer.group_counts(step, batch_size).to(FLOAT) / batch_size
        environment.train_step(mixture)
    return environment.losses.clone()


def drifting_interaction_matrices(rounds):
    """The demo's per-step A^t float64 [rounds, 3, 3]: training on group 0 helps most at first, group 1 at the
    end (the interactions drift), and learning slows down over the run."""
    rounds = check_int(rounds, "rounds", minimum=1)
    start = torch.tensor([[3.0, 0.5, 0.5], [1.0, 2.0, 0.0], [0.5, -0.3, 0.8]], dtype=FLOAT) * 1e-3
    end = torch.tensor([[1.0, 1.5, 0.0], [0.2, 3.0, 0.0], [0.3, 1.0, 0.6]], dtype=FLOAT) * 1e-3
    weights = torch.linspace(0.0, 1.0, rounds, dtype=FLOAT)[:, None, None]
    return (start * (1 - weights) + end * weights) * torch.linspace(1.0, 0.5, rounds, dtype=FLOAT)[:, None, None]


def compare_methods(*, seeds=6, rounds=10, update_steps=100, train_noise=1e-3, eval_noise=1e-3):
    """Final average loss of each method in the drifting demo environment, one row per seed (paired noise).

    Returns {method: float64 [seeds]}. Skill-It learns its graph from three 50-step single-group runs;
    DoReMi's reference losses are the losses stratified training reaches (its reference model is trained on the
    uniform mixture). "oracle" knows A^t and trains every step on the group with the largest column sum, the
    greedy optimum of the linear law.
    """
    from .aioli import Aioli
    from .baselines import DoReMi, SkillIt, Stratified, skills_graph_from_runs

    matrices = drifting_interaction_matrices(rounds)
    total = rounds * update_steps
    initial = torch.full((3,), 5.0, dtype=FLOAT)

    def environment(seed):
        return LinearLawEnvironment(initial, piecewise_interaction(matrices, round_steps=update_steps),
                                    train_noise=train_noise, eval_noise=eval_noise, seed=seed)

    results = {}
    for seed in range(seeds):
        stratified = run_mixer(Stratified(3), environment(seed), total)
        after_single = []
        for group in range(3):
            env = environment(1000 + seed)
            for _ in range(50):
                env.train_step(torch.eye(3, dtype=FLOAT)[group])
            after_single.append(env.evaluate())
        graph = skills_graph_from_runs(initial, torch.stack(after_single))
        mixers = {
            "stratified": None,
            "aioli": Aioli(3, update_steps=update_steps, lp_sweeps=2, lp_steps=2, one_hot=0.75, eta=1.0, seed=seed),
            "aioli_eta4": Aioli(3, update_steps=update_steps, lp_sweeps=2, lp_steps=2, one_hot=0.75, eta=4.0,
                                seed=seed),
            "aioli_ema": Aioli(3, update_steps=update_steps, lp_sweeps=2, lp_steps=2, one_hot=0.75, eta=1.0,
                               ema=0.5, seed=seed),
            "skillit": SkillIt(3, skills_graph=graph, update_steps=update_steps, eta=0.5, window=3),
            "doremi": DoReMi(3, reference_losses=stratified, update_steps=update_steps, step_size=1.0),
        }
        for name, mixer in mixers.items():
            final = stratified if mixer is None else run_mixer(mixer, environment(seed), total)
            results.setdefault(name, []).append(final.mean().item())
        env = environment(seed)
        for _ in range(total):
            best = int(torch.argmax(env.interaction(env.step).sum(dim=0)))
            env.train_step(torch.eye(3, dtype=FLOAT)[best])
        results.setdefault("oracle", []).append(env.losses.mean().item())
    return {name: torch.tensor(values, dtype=FLOAT) for name, values in results.items()}

