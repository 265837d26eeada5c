"""The study: stratified vs Aioli over paired seeds on a two-group, a three-group and the full default corpus.

Each setting is one ``compare`` under ``<out>/<setting>``; its tables and plot are copied to
``<results>/study_<setting>.{json,csv,md,png}`` and all settings are gathered in ``<results>/study.md``.

With ``proxy=True`` each setting is two compares: first Aioli on a smaller proxy model (``proxy_model``) under
``<out>/<setting>-proxy``, then the methods under ``<out>/<setting>-prior`` with Aioli started from the proxy
of the same seed (``prior_run``, restricted mode). The proxy keeps the setting's steps, seeds and Aioli
settings except its model (``proxy_model``) and the Aioli settings of ``PROXY_TUNED``; the main Aioli runs take
``FROM_PROXY_TUNED``'s over the setting's own; tables go to
``<results>/study_prior_<setting>.*`` and ``<results>/study_prior.md``.
"""
import json
import os
import shutil

from .checkpoint import write_text_atomic
from .compare import compare
from .config import TrainConfig, validate
from .loop import RunError

SETTINGS = {
    "two": ["code", "noise"],
    "three": ["code", "legal", "noise"],
    "full": ["code", "headers", "docs", "legal", "records", "dupes", "noise"],
}

# Settings chosen per setting on validation loss of the tuning seeds 100 and 101 (never on test; tables in
# bench/results/tune_*.md). They apply unless the study's flags or config file set the same key.
# steps: at 1000 steps the small models leave their loss plateau at a step that tiny changes of the batch
# schedule move by hundreds of steps, and that lottery, not the mixture, decides the final numbers
# (docs/RESULTS.md); by 3000 steps every run has left it. The three-group subset is the one whose static
# headroom survives that horizon (code + legal + noise: 45/45/10 beats uniform by 0.34 validation PPL; on
# docs + legal + noise the small docs group is repeated ~5 times and the headroom shrinks to 0.09).
TUNED = {
    "two": {"steps": 3000},
    "three": {"steps": 3000, "one_hot": 0.4},
    "full": {"steps": 3000, "one_hot": 0.3},
}


# The proxy's Aioli settings per setting, chosen on validation of the tuning seeds (bench/results/proxy_prior.md);
# the main runs keep TUNED's. one_hot: a LearnParams sub-phase with one_hot h puts a share h of its batches on
# one group. The tuned 0.4 and 0.3 of three and seven groups protect the main model from those bursts, at a
# price: un-mixing the smoothed sub-phases amplifies the estimate's noise 1/(h - (1 - h)/(k - 1)) times for k
# groups (10x and 5.5x). The proxy's model is thrown away after its run, so it can take the bursts of 0.75
# (1.6x and 1.4x); its last mixture then moves further, and alike across seeds.
PROXY_TUNED = {
    "two": {"one_hot": 0.75, "lp_base": "uniform"},
    "three": {"one_hot": 0.75, "lp_base": "uniform"},
    "full": {"one_hot": 0.75, "lp_base": "uniform"},
}
# The main Aioli runs' settings when they start from a proxy's mixture (over TUNED's), chosen on validation:
# with seven groups the main run with one_hot 0.3 is behind the proxy's mixture held static on every organic
# group by step 600 (0.03-0.07 nats of validation loss), and no closer with its mixture frozen (eta 1e-6);
# 0.2 keeps within a standard error of it (bench/results/full_main_one_hot.md: screened on seeds 0-9,
# validation at step 1000). Sub-phases around uniform still pull the drawn data toward uniform for 28% of the
# steps; lp_base "mixture" perturbs the current mixture instead (bench/results/full_main_lp_base.md: screened
# the same way against one_hot 0.2 around uniform and one_hot 0.3 around the mixture).
FROM_PROXY_TUNED = {
    "full": {"one_hot": 0.2, "lp_base": "mixture"},
}
# What study(proxy_settings=...) and the --proxy-* flags may set for the proxies.
PROXY_KEYS = ("one_hot", "eta", "objective")


def proxy_model(cfg):
    """The proxy's model: half the width, half the layers and half the heads of ``cfg``'s (at least 1 each);
    with the defaults (d 128, 2 layers, 4 heads) a d 64, 1-layer, 2-head GPT with about a fifth of the full
    model's FLOPs (a third of its time on one thread here: 11.6 s against 34.0 s for 300 steps)."""
    heads = max(1, cfg.heads // 2)
    width = max(heads, cfg.d_model // 2 // heads * heads)
    return {"d_model": width, "layers": max(1, cfg.layers // 2), "heads": heads}


def study(base, settings, methods, seeds, *, jobs, out, results, resume, progress=True, explicit=(), proxy=False,
          proxy_settings=None):
    """``explicit``: names of settings the user gave (flags or config file); TUNED never overrides them.
    ``proxy``: start every Aioli run from the last mixture of a proxy Aioli run of the same seed (see above),
    which runs with its setting's ``PROXY_TUNED`` Aioli settings, updated by ``proxy_settings`` (a dict over
    ``PROXY_KEYS``); the main runs then take the setting's ``FROM_PROXY_TUNED`` values unless ``explicit``."""
    proxy_settings = dict(proxy_settings or {})
    if proxy and (base.prior is not None or base.prior_run is not None):
        raise RunError("study: the proxy mode sets Aioli's prior from the proxy runs; do not also give prior or "
                       "prior_run")
    if proxy and "aioli" not in methods:
        raise RunError(f"study: the proxy mode starts Aioli from the proxies; methods must include aioli, got "
                       f"{methods}")
    unknown = sorted(set(proxy_settings) - set(PROXY_KEYS))
    if unknown:
        raise RunError(f"study: the proxy's settings may only be {list(PROXY_KEYS)}, got {unknown}")
    if proxy_settings and not proxy:
        flags = ", ".join(f"--proxy-{key.replace('_', '-')}" for key in PROXY_KEYS if key in proxy_settings)
        raise RunError(f"study: {flags} set the proxy runs' settings; give them together with --proxy")
    for key, value in proxy_settings.items():
        try:  # the run settings' own rule for each, checked before anything runs
            validate(TrainConfig(**{key: value}))
        except ValueError as exc:
            raise RunError(f"study: the proxy's {key} (--proxy-{key.replace('_', '-')}): {exc}") from None
    os.makedirs(results, exist_ok=True)
    prefix = "study_prior" if proxy else "study"

    def own(tuned):  # the tuned values the user did not set
        return {key: value for key, value in tuned.items() if key not in explicit}

    for name in settings:
        cfg = base.replace(groups=list(SETTINGS[name]), **own(TUNED[name]))
        folder = os.path.join(out, f"{name}-prior" if proxy else name)
        title = f"{name}: {' + '.join(SETTINGS[name])}"
        if proxy:
            proxies = os.path.join(out, f"{name}-proxy")
            small = proxy_model(cfg)
            aioli = {**PROXY_TUNED[name], **proxy_settings}
            compare(cfg.replace(**aioli, **small), ["aioli"], seeds, jobs=jobs, out=proxies, resume=resume,
                    progress=progress, title=f"{title} (proxy: d {small['d_model']}, {small['layers']} layers, "
                                             + ", ".join(f"{k} {v}" for k, v in aioli.items()) + ")")
            cfg = cfg.replace(prior_run=os.path.join(proxies, "aioli-s{seed}"), **own(FROM_PROXY_TUNED.get(name, {})))
            title += ", Aioli from the proxy's mixture"
        compare(cfg, methods, seeds, jobs=jobs, out=folder, resume=resume, progress=progress, title=title)
        for ext in ("json", "csv", "md", "png"):
            shutil.copyfile(os.path.join(folder, f"compare.{ext}"), os.path.join(results, f"{prefix}_{name}.{ext}"))
    gather(results, prefix)
    return [json.load(open(os.path.join(results, f"{prefix}_{n}.json"))) for n in settings]


def gather(results, prefix):
    """Write ``<results>/<prefix>.md`` from every setting's ``<prefix>_<setting>.md`` found there, so a study
    run on some settings keeps the tables of the others."""
    parts = []
    for name in SETTINGS:
        path = os.path.join(results, f"{prefix}_{name}.md")
        if os.path.isfile(path):
            with open(path) as handle:
                parts.append(handle.read())
            parts.append(f"![{name}]({prefix}_{name}.png)\n")
    write_text_atomic("\n".join(parts), os.path.join(results, f"{prefix}.md"))
