"""The study command: per-setting tuned Aioli settings apply unless the user set the same key."""
import json
import os

import pytest

from aioli_ext import __main__ as cli
from aioli_ext.train import study as study_module
from aioli_ext.train.config import TrainConfig


@pytest.fixture
def captured(monkeypatch, tmp_path):
    calls = []

    def fake_compare(cfg, methods, seeds, *, jobs, out, resume, progress, title):
        calls.append(cfg)
        summary = {"title": title, "groups": cfg.groups}
        os.makedirs(out, exist_ok=True)
        for ext in ("json", "csv", "md", "png"):
            with open(os.path.join(out, f"compare.{ext}"), "w") as handle:
                handle.write(json.dumps(summary) if ext == "json" else title)
        return summary

    monkeypatch.setattr(study_module, "compare", fake_compare)
    monkeypatch.setattr(study_module, "TUNED", {"two": {}, "three": {"one_hot": 0.5},
                                                "full": {"one_hot": 0.3, "eta": 0.4}})
    return calls


def test_tuned_settings_apply_per_setting(captured, tmp_path):
    study_module.study(TrainConfig(), ["two", "three", "full"], ["aioli"], [0], jobs=1, out=str(tmp_path / "s"),
                       results=str(tmp_path / "r"), resume=False, progress=False)
    two, three, full = captured
    assert two.groups == study_module.SETTINGS["two"] and two.one_hot == TrainConfig().one_hot
    assert three.one_hot == 0.5 and three.eta == TrainConfig().eta
    assert full.groups == study_module.SETTINGS["full"] and (full.one_hot, full.eta) == (0.3, 0.4)
    assert (tmp_path / "r" / "study.md").is_file()


def test_explicit_flags_and_config_keys_win_over_tuned(captured, tmp_path, monkeypatch):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"eta": 0.9}))
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "corpus"))
    code = cli.main(["study", "--settings", "full", "--seeds", "0", "--jobs", "1", "--one-hot", "0.6",
                     "--config", str(config), "--out", str(tmp_path / "s"), "--results", str(tmp_path / "r")])
    assert code == 0
    (full,) = captured
    assert (full.one_hot, full.eta) == (0.6, 0.9)
