"""Data mixers for training runs: the Linear Mixing Optimization (LMO) framework, Aioli, and the baselines.

A mixer is a state machine driven by the optimizer-step counter (see :mod:`aioli_ext.mixing.base`)::

    mixer = Aioli(num_groups=3, update_steps=200, lp_sweeps=2, lp_steps=4, one_hot=0.75, eta=0.3)
    for step in range(total_steps):
        if mixer.wants_eval(step):
            mixer.observe(step, evaluator(model))   # per-group mean validation losses [m]
        p = mixer.proportions(step)                 # float64 [m] for every micro-batch of this step
        ...
"""
from .aioli import Aioli
from .allocation import largest_remainder, phase_group_counts
from .base import Mixer, Phase
from .baselines import DoReMi, RoundMixer, SkillIt, Static, Stratified, skills_graph_from_runs
from .checks import MixerProtocolError, MixerSettingsMismatch
from .evaluator import GroupEvaluator
from .lmo import (LP_BASES, OBJECTIVES, eg_gradient, exponentiated_gradient_step, linear_dynamic_law,
                  mix_with_uniform, normalize_interaction, objective_weights, smoothed_one_hot, smoothing_matrix,
                  unmix_smoothing)
from .log import MixingLog
from .simulation import LinearLawEnvironment, piecewise_interaction, run_mixer
from .static_law import StaticLaw, best_mixture, simplex_grid

MIXERS = {cls.method: cls for cls in (Aioli, Stratified, Static, SkillIt, DoReMi)}


def mixer_from_state_dict(state):
    """Rebuild a mixer from its ``state_dict()`` alone (settings included) and load the state into it."""
    if not isinstance(state, dict) or state.get("method") not in MIXERS:
        raise ValueError(f"state must come from Mixer.state_dict() of one of {sorted(MIXERS)}, got method "
                         f"{state.get('method') if isinstance(state, dict) else type(state).__name__!r}")
    cls = MIXERS[state["method"]]
    # A state saved before a setting existed is rebuilt with the value it behaved as, not today's default.
    mixer = cls(**{**cls.config_added, **state["config"]})
    mixer.load_state_dict(state)
    return mixer


__all__ = [
    "Aioli", "DoReMi", "GroupEvaluator", "LP_BASES", "LinearLawEnvironment", "MIXERS", "Mixer", "MixerProtocolError",
    "MixerSettingsMismatch", "MixingLog", "OBJECTIVES", "Phase", "RoundMixer", "SkillIt", "Static", "StaticLaw",
    "Stratified", "best_mixture", "eg_gradient", "exponentiated_gradient_step", "largest_remainder",
    "linear_dynamic_law", "mix_with_uniform", "mixer_from_state_dict", "normalize_interaction", "objective_weights",
    "phase_group_counts", "piecewise_interaction", "run_mixer", "simplex_grid", "skills_graph_from_runs",
    "smoothed_one_hot", "smoothing_matrix", "unmix_smoothing",
]
