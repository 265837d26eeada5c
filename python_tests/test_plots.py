"""The comparison plot for every mix of methods and group counts, stratified alone included."""
import pytest
from matplotlib import image

from aioli_ext.train.plots import plot_compare


def _result(method, seed, groups, steps=3):
    k = len(groups)
    uniform = [1.0 / k] * k
    skewed = [0.5] + [0.5 / (k - 1)] * (k - 1) if k > 1 else [1.0]
    return {"method": method, "seed": seed, "groups": groups,
            "proportions": [uniform] + [skewed] * (steps - 1) if method != "stratified" else [uniform] * steps,
            "val_curve": [{"step": 10 * i, "losses": [3.0 - 0.1 * i + 0.01 * g for g in range(k)]}
                          for i in range(steps)]}


@pytest.mark.parametrize("methods", [["stratified"], ["aioli"], ["stratified", "aioli"], ["static", "aioli"]])
@pytest.mark.parametrize("num_groups", [2, 7])
def test_plot_compare_draws_every_mix_of_methods(tmp_path, methods, num_groups):
    groups = [f"g{i}" for i in range(num_groups)]
    results = [_result(m, s, groups) for m in methods for s in (0, 1)]
    path = tmp_path / "compare.png"
    plot_compare(results, str(path), title="t")
    pixels = image.imread(str(path))
    # One panel per mixing method plus the loss panel, 4.2 inches each at 80 dpi.
    panels = len([m for m in methods if m != "stratified"]) + 1
    assert pixels.shape[1] == round(4.2 * panels * 80)
