"""What a mixer decided and saw, kept for plots and reports, and saved in its state_dict so it survives
resume.

Everything is stored as plain Python numbers and lists (JSON-ready, and loadable by
``torch.load(weights_only=True)``): float64 values convert to Python floats exactly.
"""
import copy
import math

import torch

from .checks import FLOAT, check_int


def _to_list(tensor):
    return torch.as_tensor(tensor, dtype=FLOAT).tolist()


class MixingLog:
    """A mixer's history.

    Attributes:
        num_groups: m.
        phases: list of ``{"start": int, "stop": int | None, "proportions": [m floats], "label": str}``,
            one per stretch of steps on one mixture, in step order (``stop`` exclusive, None = until further
            notice). Labels: ``"prior"``, ``"learn_params"`` (with ``"group"``: the hot group), ``"mix"``,
            ``"static"``.
        evaluations: list of ``{"step": int, "losses": [m floats]}``: the per-group losses observed after
            ``step`` optimizer steps.
        estimates: list of ``{"round": int, "step": int, <name>: [[m floats] × m] ...}``: each interaction
            matrix a method estimated (Aioli: ``measured`` B, ``interaction`` A, ``normalized``, ``ema``).
    """

    def __init__(self, num_groups):
        self.num_groups = check_int(num_groups, "num_groups", minimum=1)
        self.phases = []
        self.evaluations = []
        self.estimates = []

    def record_phase(self, start, stop, proportions, label, **extra):
        self.phases.append({"start": int(start), "stop": None if stop is None else int(stop),
                            "proportions": _to_list(proportions), "label": str(label), **extra})

    def record_evaluation(self, step, losses):
        self.evaluations.append({"step": int(step), "losses": _to_list(losses)})

    def record_estimate(self, round_index, step, **matrices):
        entry = {"round": int(round_index), "step": int(step)}
        entry.update({name: _to_list(value) for name, value in matrices.items()})
        self.estimates.append(entry)

    def proportions_per_step(self, num_steps):
        """The proportions of every step 0..num_steps−1 as float64 [num_steps, m]; NaN rows for steps no phase
        has covered yet (steps beyond the mixer's current position)."""
        num_steps = check_int(num_steps, "num_steps", minimum=0)
        table = torch.full((num_steps, self.num_groups), math.nan, dtype=FLOAT)
        for phase in self.phases:
            stop = num_steps if phase["stop"] is None else min(phase["stop"], num_steps)
            if phase["start"] < stop:
                table[phase["start"]:stop] = torch.tensor(phase["proportions"], dtype=FLOAT)
        return table

    def evaluation_table(self):
        """(steps int64 [E], losses float64 [E, m]) of every observed evaluation, in order."""
        steps = torch.tensor([entry["step"] for entry in self.evaluations], dtype=torch.int64)
        losses = torch.tensor([entry["losses"] for entry in self.evaluations], dtype=FLOAT).view(-1, self.num_groups)
        return steps, losses

    def estimate_matrices(self, name):
        """Every logged matrix called ``name`` as float64 [R, m, m], in round order."""
        rows = [entry[name] for entry in self.estimates if name in entry]
        return torch.tensor(rows, dtype=FLOAT).view(-1, self.num_groups, self.num_groups)

    def to_dict(self):
        """A deep copy as plain lists and dicts (what ``state_dict`` and JSON writers store)."""
        return copy.deepcopy({"num_groups": self.num_groups, "phases": self.phases,
                              "evaluations": self.evaluations, "estimates": self.estimates})

    def load_dict(self, state):
        if int(state["num_groups"]) != self.num_groups:
            raise ValueError(f"log state has num_groups = {state['num_groups']}, this log has {self.num_groups}")
        state = copy.deepcopy(state)
        self.phases, self.evaluations, self.estimates = state["phases"], state["evaluations"], state["estimates"]
