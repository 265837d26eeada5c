"""PNG plots (matplotlib, Agg backend): mixture proportions over steps and per-group validation loss."""
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = plt.get_cmap("tab10").colors


def _proportion_axes(ax, steps, table, groups, title):
    bottom = [0.0] * len(steps)
    for g, name in enumerate(groups):
        top = [b + (row[g] if not math.isnan(row[g]) else 0.0) for b, row in zip(bottom, table)]
        ax.fill_between(steps, bottom, top, step="post", color=COLORS[g % 10], alpha=0.8, label=name, linewidth=0)
        bottom = top
    ax.set_ylim(0, 1)
    ax.set_xlim(0, len(steps))
    ax.set_xlabel("step")
    ax.set_ylabel("proportion")
    ax.set_title(title, fontsize=9)


def plot_run(result, path):
    """One run: stacked proportions per step (left), per-group validation loss (right)."""
    groups = result["groups"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    table = result["proportions"]
    _proportion_axes(left, list(range(len(table))), table, groups, f"{result['method']} seed {result['seed']}: mixture")
    left.legend(fontsize=7, loc="upper right")
    steps = [c["step"] for c in result["val_curve"]]
    for g, name in enumerate(groups):
        right.plot(steps, [c["losses"][g] for c in result["val_curve"]], color=COLORS[g % 10], label=name)
    right.set_xlabel("step")
    right.set_ylabel("validation loss (nats/token)")
    right.set_title("per-group validation loss", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_compare(results, path, title=""):
    """A comparison: mean proportions of every non-stratified method (one panel each, averaged over seeds) and
    mean per-group validation loss of each method (dashed: stratified)."""
    by_method = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    groups = results[0]["groups"]
    mixing = [m for m in by_method if m != "stratified"]
    fig, axes = plt.subplots(1, len(mixing) + 1, figsize=(4.2 * (len(mixing) + 1), 3.3), squeeze=False)
    axes = axes[0]
    for ax, method in zip(axes, mixing):
        runs = by_method[method]
        steps = len(runs[0]["proportions"])
        mean = [[sum(r["proportions"][s][g] for r in runs) / len(runs) for g in range(len(groups))]
                for s in range(steps)]
        _proportion_axes(ax, list(range(steps)), mean, groups, f"{method}: mixture (mean of {len(runs)} seeds)")
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[-1]
    styles = {"stratified": "--"}
    # With more than three groups the legend names each group once, on the first method's lines (any method:
    # a compare of stratified alone has no mixing method).
    first = next(iter(by_method))
    for method, runs in by_method.items():
        steps = [c["step"] for c in runs[0]["val_curve"]]
        for g, name in enumerate(groups):
            mean = [sum(r["val_curve"][i]["losses"][g] for r in runs) / len(runs) for i in range(len(steps))]
            ax.plot(steps, mean, styles.get(method, "-"), color=COLORS[g % 10],
                    label=f"{name} ({method})" if len(groups) <= 3 else (name if method == first else None),
                    linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("per-group val loss, mean over seeds (dashed: stratified)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
