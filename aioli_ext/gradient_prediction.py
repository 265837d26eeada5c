"""Prediction of the upstream coefficient of group_cross_entropy's gradient rows (pure Python, no ops).

Plain ``loss.backward()`` through :func:`aioli_ext.group_cross_entropy` needs each gradient row
``softmax - onehot`` multiplied by its upstream coefficient ``dL/dloss[i] + dL/dgroup_sums[g(i)]``, which is only
known in backward. The forward kernel writes the rows already multiplied by a prediction of it
(:func:`predicted_group_scale`); backward compares (aioli_ext.ops) and either hands the buffer on (hit) or
rescales it by real / predicted (miss), teaching this module the form of the real coefficient
(:func:`record_miss`). Correctness never depends on a prediction; only the extra pass over [N, V] does.
"""
import os
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch


class GradientScalePredictionInfo(NamedTuple):
    """State of the upstream-coefficient prediction (:func:`gradient_scale_prediction`).

    enabled: whether CPU forwards pre-scale the gradient. hits: backward passes whose coefficients equalled the
    prediction (no pass over the gradient). misses: backward passes that rescaled the gradient.
    """

    enabled: bool
    hits: int
    misses: int


# How the predicted coefficient of group g is formed from a numerator m[g] and a denominator d: the non-ignored
# tokens of the call ("tokens": a token mean), the rows ("rows": loss.mean()), the group's non-ignored tokens
# ("groups": weighted group means) or 1 ("one": weighted sums); either m / d ("divide") or m * (1 / d)
# ("reciprocal"), the two roundings an autograd graph produces (x / n backward divides the upstream gradient
# by n; w * (x / n) backward multiplies w by 1 / n). This order breaks ties.
_FORMS = (("tokens", "divide"), ("tokens", "reciprocal"), ("rows", "divide"), ("rows", "reciprocal"),
          ("groups", "divide"), ("groups", "reciprocal"), ("one", "divide"))
_TOKEN_MEAN_FORM = ("tokens", "divide")


class _PredictionState:
    def __init__(self):
        self.enabled = os.environ.get("AIOLI_EXT_GRADIENT_PREDICTION", "1") != "0"
        self.hits = 0
        self.misses = 0
        # (num_groups, accumulation dtype) -> (form, numerators [K]) in use / per form, the range [low, high]
        # of numerators consistent with the misses so far.
        self.patterns: Dict[tuple, Tuple[Tuple[str, str], torch.Tensor]] = {}
        self.fits: Dict[tuple, Dict[Tuple[str, str], Tuple[torch.Tensor, torch.Tensor]]] = {}


_prediction = _PredictionState()


def gradient_scale_prediction(enabled: Optional[bool] = None, *, reset: bool = False) -> GradientScalePredictionInfo:
    """Switch and inspect how plain ``loss.backward()`` through :func:`group_cross_entropy` avoids a pass over
    the [N, V] gradient (CPU; CUDA always scales in backward, which needs no host synchronisation).

    The forward pass writes the gradient rows already multiplied by a predicted upstream coefficient.
    Backward computes the real coefficients ``dL/dloss[i] + dL/dgroup_sums[g(i)]``; if every one equals the
    prediction bit for bit, the buffer is the gradient as it stands; otherwise it is rescaled by real /
    predicted per row. Either way the gradient is that of the real upstream gradients (the rescaled one carries
    one more rounding in the logits' dtype, as without prediction). The first prediction is the token mean,
    1 / non-ignored tokens (for fp16 logits: no pre-scaling, which keeps small gradients out of fp16's
    subnormal range until a real coefficient is known). A miss teaches the predictor the form numerator[g] /
    (tokens | rows | group tokens | 1) that reproduces the real coefficients exactly -- a loss scale
    (``GradScaler``), a division for gradient accumulation, ``loss.mean()``, fixed per-group weights -- and
    later calls use it. Patterns are kept per (num_groups, accumulation dtype); two different objectives over
    the same K alternate and simply miss.

    Args:
        enabled: switch prediction on or off (off: the gradient is written unscaled and always rescaled, the
            behaviour without prediction). None keeps the setting. Default: on, or the environment variable
            AIOLI_EXT_GRADIENT_PREDICTION=0 for off.
        reset: forget learned patterns and zero the counters.
    """
    if enabled is not None:
        _prediction.enabled = bool(enabled)
    if reset:
        _prediction.hits = _prediction.misses = 0
        _prediction.patterns.clear()
        _prediction.fits.clear()
    return GradientScalePredictionInfo(_prediction.enabled, _prediction.hits, _prediction.misses)


def _denominator_values(kind: str, group_counts: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """[K] denominators of a prediction form (clamped to >= 1: a group without tokens uses no coefficient)."""
    if kind == "tokens":
        values = group_counts.sum().expand(group_counts.shape[0])
    elif kind == "rows":
        values = torch.full_like(group_counts, rows)
    elif kind == "groups":
        values = group_counts
    else:
        values = torch.ones_like(group_counts)
    return values.clamp_min(1).to(dtype)


def _apply_form(formula: str, numerators: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    if formula == "divide":
        return numerators / denominators
    return numerators * (torch.ones_like(denominators) / denominators)


def _numerator_bounds(formula, group_coef, denominators):
    """Per group, the range [low, high] of numerators m that give group_coef exactly (in its dtype) through
    ``formula``, and whether there is one. Several adjacent floats can round to the same coefficient; the one
    the graph used lies among them, and each further step narrows the range (see _learn_prediction)."""
    center = (group_coef.double() * denominators.double()).to(group_coef.dtype)
    matched = _apply_form(formula, center, denominators) == group_coef
    # The rounded product can land one ulp off the range.
    for direction in (float("inf"), float("-inf")):
        neighbour = torch.nextafter(center, torch.full_like(center, direction))
        fixed = ~matched & (_apply_form(formula, neighbour, denominators) == group_coef)
        center = torch.where(fixed, neighbour, center)
        matched |= fixed
    bounds = []
    for direction in (float("-inf"), float("inf")):
        edge, growing = center, matched.clone()
        for _ in range(8):
            step = torch.nextafter(edge, torch.full_like(edge, direction))
            growing &= _apply_form(formula, step, denominators) == group_coef
            edge = torch.where(growing, step, edge)
        bounds.append(edge)
    usable = matched & torch.isfinite(center) & (center != 0)
    return bounds[0], bounds[1], usable


def _learn_prediction(coef, counted, row_groups, num_groups):
    """After a miss: fit every prediction form to the real per-row coefficients and choose the one to use.

    For each form the numerators consistent with every miss so far are kept as per-group ranges: a form whose
    earlier range still contains a numerator for this step (the ranges intersect) has explained all of them,
    the best evidence; the prediction uses the middle of the range."""
    key = (num_groups, coef.dtype)
    group_of_counted = row_groups[counted]
    coef_of_counted = coef[counted]
    if coef_of_counted.numel() == 0:
        return
    group_coef = torch.zeros(num_groups, dtype=coef.dtype).scatter_(0, group_of_counted, coef_of_counted)
    if not torch.equal(group_coef.index_select(0, group_of_counted), coef_of_counted):
        # Coefficients that differ within a group (per-token weights) follow no per-group form.
        _prediction.patterns.pop(key, None)
        _prediction.fits.pop(key, None)
        return
    group_counts = torch.bincount(group_of_counted, minlength=num_groups)
    present = group_counts > 0
    previous = _prediction.fits.get(key, {})
    fits, stable = {}, []
    for form in _FORMS:
        kind, formula = form
        low, high, usable = _numerator_bounds(formula, group_coef,
                                              _denominator_values(kind, group_counts, coef.shape[0], coef.dtype))
        if not bool(usable[present].all()):
            continue
        if form in previous:
            earlier_low, earlier_high = previous[form]
            both_low, both_high = torch.maximum(low, earlier_low), torch.minimum(high, earlier_high)
            if bool((both_low <= both_high)[present].all()):
                stable.append(form)
                low, high = both_low, both_high
            # Groups without tokens this time keep what earlier steps said about them.
            low, high = torch.where(present, low, earlier_low), torch.where(present, high, earlier_high)
        else:
            present_values = low[present]
            shared = bool((present_values == present_values[0]).all() and (high[present] == high[present][0]).all())
            fill_low = torch.full_like(low, present_values[0] if shared else 1.0)
            fill_high = torch.full_like(high, high[present][0] if shared else 1.0)
            low, high = torch.where(present, low, fill_low), torch.where(present, high, fill_high)
        fits[form] = (low, high)
    _prediction.fits[key] = fits
    numerators = {form: low + (high - low) / 2 for form, (low, high) in fits.items()}

    # From one step alone, prefer numerators that are all 1, then numerators shared by every group.
    def simplicity(form):
        low, high = fits[form]
        one_fits = bool(((low <= 1) & (high >= 1))[present].all())
        shared = bool((low[present].max() <= high[present].min()))
        return 0 if one_fits else 1 if shared else 2

    choice = stable[0] if stable else min(fits, key=simplicity, default=None)
    if choice is None:
        _prediction.patterns.pop(key, None)
        return
    low, high = fits[choice]
    if simplicity(choice) == 0:
        chosen = torch.ones_like(low)
    elif simplicity(choice) == 1:
        common_low, common_high = low[present].max(), high[present].min()
        chosen = torch.full_like(low, float(common_low + (common_high - common_low) / 2))
    else:
        chosen = numerators[choice]
    _prediction.patterns[key] = (choice, chosen)


def predicted_group_scale(num_groups: int, acc_dtype: torch.dtype, logits_dtype: torch.dtype, rows: int,
                          group_counts: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """The predicted coefficient of each group ([K], ``acc_dtype``, CPU), or None for no prediction (ones).

    group_counts() gives the non-ignored tokens per group (int64 [K]); it is only called when a form needs it.
    """
    if not _prediction.enabled:
        return None
    pattern = _prediction.patterns.get((num_groups, acc_dtype))
    if pattern is None:
        if logits_dtype == torch.float16:
            return None
        pattern = (_TOKEN_MEAN_FORM, torch.ones(num_groups, dtype=acc_dtype))
    (kind, formula), numerators = pattern
    counts = group_counts() if kind in ("tokens", "groups") else torch.zeros(num_groups, dtype=torch.int64)
    scale = _apply_form(formula, numerators, _denominator_values(kind, counts, rows, acc_dtype))
    # The pre-scaled rows must be able to become any real coefficient: no zero, no overflow of the logits'
    # dtype, nothing below its normal range (a guess that is wrong would then lose the rows' small entries).
    finfo = torch.finfo(logits_dtype)
    magnitude = scale.abs()
    if not bool(((magnitude >= finfo.tiny) & (magnitude <= finfo.max / 4)).all()):
        return None
    return scale


def record_hit() -> None:
    _prediction.hits += 1


def record_miss(coef: torch.Tensor, counted: torch.Tensor, row_groups: torch.Tensor, num_groups: int) -> None:
    """A backward whose coefficients (coef [N], 0 on ignored rows; counted [N] bool; row_groups [N] int64)
    differed from the prediction: learn from them when prediction is on."""
    _prediction.misses += 1
    if _prediction.enabled:
        _learn_prediction(coef, counted, row_groups, num_groups)
