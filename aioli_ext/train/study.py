"""The study: stratified vs Aioli over paired seeds on a two-group, a three-group and the full default corpus.

Each setting is one ``compare`` under ``<out>/<setting>``; its tables and plot are copied to
``<results>/study_<setting>.{json,csv,md,png}`` and all settings are gathered in ``<results>/study.md``.
"""
import json
import os
import shutil

from .checkpoint import write_text_atomic
from .compare import compare

SETTINGS = {
    "two": ["code", "noise"],
    "three": ["docs", "legal", "noise"],
    "full": ["code", "headers", "docs", "legal", "records", "dupes", "noise"],
}


def study(base, settings, methods, seeds, *, jobs, out, results, resume, progress=True):
    os.makedirs(results, exist_ok=True)
    for name in settings:
        cfg = base.replace(groups=list(SETTINGS[name]))
        folder = os.path.join(out, name)
        title = f"{name}: {' + '.join(SETTINGS[name])}"
        compare(cfg, methods, seeds, jobs=jobs, out=folder, resume=resume, progress=progress, title=title)
        for ext in ("json", "csv", "md", "png"):
            shutil.copyfile(os.path.join(folder, f"compare.{ext}"), os.path.join(results, f"study_{name}.{ext}"))
    parts = []
    for name in SETTINGS:
        path = os.path.join(results, f"study_{name}.md")
        if os.path.isfile(path):
            with open(path) as handle:
                parts.append(handle.read())
            parts.append(f"![{name}](study_{name}.png)\n")
    write_text_atomic("\n".join(parts), os.path.join(results, "study.md"))
    return [json.load(open(os.path.join(results, f"study_{n}.json"))) for n in settings]
