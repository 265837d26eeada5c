"""Argument checks shared by the mixers: every message names the argument and the rule it broke.

Vectors and matrices are returned as fresh float64 CPU tensors, so the K-sized math never aliases a
caller's tensor and never runs in a lower precision than float64.
"""
import math
import numbers

import torch

FLOAT = torch.float64


class MixerProtocolError(RuntimeError):
    """A mixer was driven out of order: a step went backwards, an evaluation was skipped or observed at the
    wrong step."""


class MixerSettingsMismatch(ValueError):
    """A state_dict was saved by a mixer with other settings. ``differing``: {setting: (saved, this mixer's)}."""

    def __init__(self, message, differing):
        super().__init__(message)
        self.differing = differing


def check_int(value, name, *, minimum=None):
    """Return ``value`` as an int; bools, floats and other types are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_optional_int(value, name, *, minimum=None):
    return None if value is None else check_int(value, name, minimum=minimum)


def check_float(value, name, *, low=None, high=None, low_open=False, high_open=False):
    """Return ``value`` as a finite float inside the given interval (closed unless ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def to_tensor(value):
    """``value`` as a tensor; Python numbers convert straight to float64 (torch would make them float32)."""
    if isinstance(value, torch.Tensor):
        return value
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() and tensor.dtype != FLOAT and not hasattr(value, "dtype"):
        tensor = torch.as_tensor(value, dtype=FLOAT)
    return tensor


def as_float_tensor(value, name, shape):
    """Return ``value`` (tensor, array or nested sequence) as a new float64 CPU tensor of ``shape``, finite."""
    try:
        tensor = to_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor or a sequence of numbers ({exc})") from exc
    if tensor.dtype == torch.bool or tensor.is_complex() or not (
            tensor.is_floating_point() or tensor.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32,
                                                           torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    tensor = tensor.detach().to(device="cpu", dtype=FLOAT).clone()
    if not bool(torch.isfinite(tensor).all()):
        bad = torch.nonzero(~torch.isfinite(tensor)).flatten().tolist()
        raise ValueError(f"{name} must be finite, got non-finite values at index {bad}: {tensor.tolist()}")
    return tensor


def as_losses(value, num_groups, name="losses"):
    """Per-group losses: float64 [num_groups], finite (NaN or inf means the evaluation is broken)."""
    return as_float_tensor(value, name, (num_groups,))


def as_proportions(value, num_groups, name="proportions"):
    """Non-negative weights with a positive sum, returned normalised to sum to 1 (float64 [num_groups])."""
    weights = as_float_tensor(value, name, (num_groups,))
    if bool((weights < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {weights.tolist()}")
    total = float(weights.sum())
    if not total > 0:
        raise ValueError(f"{name} must have a positive sum, got {weights.tolist()}")
    return weights / total


def check_step(step, name="step"):
    return check_int(step, name, minimum=0)
