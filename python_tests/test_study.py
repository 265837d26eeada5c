"""The study command: per-setting tuned Aioli settings apply unless the user set the same key."""
import json
import os

import pytest

from aioli_ext import __main__ as cli
from aioli_ext.train import study as study_module
from aioli_ext.train.config import TrainConfig
from aioli_ext.train.loop import RunError


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


def _captured_calls(monkeypatch):
    calls = []

    def fake_compare(cfg, methods, seeds, *, jobs, out, resume, progress, title):
        calls.append((cfg, list(methods), out))
        os.makedirs(out, exist_ok=True)
        for ext in ("json", "csv", "md", "png"):
            with open(os.path.join(out, f"compare.{ext}"), "w") as handle:
                handle.write(json.dumps({"title": title}) if ext == "json" else title)
        return {}

    monkeypatch.setattr(study_module, "compare", fake_compare)
    return calls


def test_proxy_mode_trains_the_proxies_then_starts_aioli_from_them(monkeypatch, tmp_path):
    calls = _captured_calls(monkeypatch)
    out = str(tmp_path / "s")
    study_module.study(TrainConfig(), ["two", "three"], ["stratified", "aioli"], [0, 1], jobs=1, out=out,
                       results=str(tmp_path / "r"), resume=False, progress=False, proxy=True)
    assert len(calls) == 4
    for (small, small_methods, small_out), (main, methods, main_out), name in zip(calls[::2], calls[1::2],
                                                                                   ["two", "three"]):
        assert small_methods == ["aioli"] and small_out == os.path.join(out, f"{name}-proxy")
        assert (small.d_model, small.layers, small.heads) == (64, 1, 2) and small.prior_run is None
        # The proxy runs with PROXY_TUNED's Aioli settings; the main runs keep the setting's tuned values.
        tuned = study_module.PROXY_TUNED[name]
        assert small.one_hot == tuned["one_hot"] == 0.75
        assert all(getattr(small, key) == value for key, value in tuned.items())
        main_tuned = {**study_module.TUNED[name], **study_module.FROM_PROXY_TUNED.get(name, {})}
        assert main.one_hot == main_tuned.get("one_hot", TrainConfig().one_hot)
        assert (main.eta, main.objective) == (TrainConfig().eta, TrainConfig().objective)
        # Everything else is the setting's own: groups, steps and the other Aioli settings.
        own = {key: getattr(main, key) for key in tuned}
        assert small.replace(d_model=128, layers=2, heads=4, **own) == main.replace(prior_run=None)
        assert main.prior_run == os.path.join(out, f"{name}-proxy", "aioli-s{seed}")
        assert methods == ["stratified", "aioli"] and main_out == os.path.join(out, f"{name}-prior")
        assert (tmp_path / "r" / f"study_prior_{name}.md").is_file()
    assert (tmp_path / "r" / "study_prior.md").is_file() and not (tmp_path / "r" / "study.md").exists()
    assert main.one_hot == 0.4 != small.one_hot  # the three-group setting, where the two differ


def test_main_runs_from_a_proxy_take_their_own_tuned_values(monkeypatch, tmp_path):
    calls = _captured_calls(monkeypatch)
    monkeypatch.setattr(study_module, "TUNED", {**study_module.TUNED, "two": {"one_hot": 0.4, "lr": 0.004}})
    monkeypatch.setattr(study_module, "FROM_PROXY_TUNED", {"two": {"one_hot": 0.55, "eta": 0.7}})
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "corpus"))
    common = ["--settings", "two", "--seeds", "0", "--out", str(tmp_path / "s"), "--results", str(tmp_path / "r")]
    assert cli.main(["study", "--proxy", *common]) == 0
    (small, _, _), (main, _, _) = calls
    # FROM_PROXY_TUNED reaches the main runs over TUNED; the proxy keeps PROXY_TUNED and the base settings.
    assert (main.one_hot, main.eta, main.lr) == (0.55, 0.7, 0.004)
    assert (small.one_hot, small.eta, small.lr) == (study_module.PROXY_TUNED["two"]["one_hot"], TrainConfig().eta,
                                                    0.004)
    # Without --proxy the runs start from uniform and keep TUNED's values.
    calls.clear()
    assert cli.main(["study", *common]) == 0
    ((plain, _, _),) = calls
    assert (plain.one_hot, plain.eta) == (0.4, TrainConfig().eta)
    # A flag the user gives wins over both.
    calls.clear()
    assert cli.main(["study", "--proxy", "--one-hot", "0.35", "--lp-base", "mixture", *common]) == 0
    (small, _, _), (main, _, _) = calls
    assert (main.one_hot, main.eta) == (0.35, 0.7) and small.one_hot == study_module.PROXY_TUNED["two"]["one_hot"]
    # The proxies start from uniform and keep the paper's sub-phases whatever the main runs use.
    assert (main.lp_base, small.lp_base) == ("mixture", "uniform")


def test_proxy_flags_reach_the_proxies_only(monkeypatch, tmp_path):
    calls = _captured_calls(monkeypatch)
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "corpus"))
    code = cli.main(["study", "--proxy", "--proxy-one-hot", "0.9", "--proxy-eta", "2.5", "--proxy-objective",
                     "perplexity", "--settings", "full", "--seeds", "0", "--out", str(tmp_path / "s"),
                     "--results", str(tmp_path / "r")])
    assert code == 0
    (small, _, _), (main, _, _) = calls
    assert (small.one_hot, small.eta, small.objective) == (0.9, 2.5, "perplexity")
    # The seven-group main runs from a proxy use one_hot 0.2 around their current mixture
    # (bench/results/full_main_one_hot.md, bench/results/full_main_lp_base.md); the proxies perturb uniform.
    assert (main.one_hot, main.lp_base, main.eta, main.objective) == (0.2, "mixture", 0.3, "loss")
    assert small.lp_base == "uniform"
    # One flag changes its own setting; the others stay the setting's PROXY_TUNED values.
    calls.clear()
    assert cli.main(["study", "--proxy", "--proxy-eta", "0.6", "--settings", "two", "--seeds", "0",
                     "--out", str(tmp_path / "s"), "--results", str(tmp_path / "r")]) == 0
    (small, _, _), _ = calls
    assert small.eta == 0.6 and small.one_hot == study_module.PROXY_TUNED["two"]["one_hot"]


def test_study_function_refuses_unknown_or_orphan_proxy_settings(monkeypatch, tmp_path):
    calls = _captured_calls(monkeypatch)
    run = dict(jobs=1, out=str(tmp_path / "s"), results=str(tmp_path / "r"), resume=False, progress=False)
    with pytest.raises(RunError, match=r"the proxy's settings may only be \['one_hot', 'eta', 'objective'\], "
                                       r"got \['lr'\]"):
        study_module.study(TrainConfig(), ["two"], ["aioli"], [0], proxy=True, proxy_settings={"lr": 0.1}, **run)
    with pytest.raises(RunError, match=r"study: --proxy-eta set the proxy runs' settings; give them together "
                                       r"with --proxy"):
        study_module.study(TrainConfig(), ["two"], ["aioli"], [0], proxy_settings={"eta": 1.0}, **run)
    assert calls == [] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--proxy-one-hot", "0.9"], "--proxy-one-hot set the proxy runs' settings; give them together with --proxy"),
    (["--proxy-eta", "1", "--proxy-objective", "perplexity"],
     "--proxy-eta, --proxy-objective set the proxy runs' settings; give them together with --proxy"),
    (["--proxy", "--proxy-eta", "0"], "the proxy's eta (--proxy-eta): eta must be > 0.0, got 0.0"),
    (["--proxy", "--proxy-eta", "inf"], "the proxy's eta (--proxy-eta): eta must be a finite number"),
    (["--proxy", "--proxy-one-hot", "1.5"], "the proxy's one_hot (--proxy-one-hot): one_hot must be <= 1.0, got 1.5"),
    (["--proxy", "--proxy-one-hot", "0"], "the proxy's one_hot (--proxy-one-hot): one_hot must be > 0.0, got 0.0"),
    (["--proxy", "--proxy-one-hot", "nan"], "the proxy's one_hot (--proxy-one-hot): one_hot must be a finite number"),
])
def test_bad_proxy_settings_are_refused_before_anything_runs(monkeypatch, tmp_path, capsys, flags, message):
    calls = _captured_calls(monkeypatch)
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "corpus"))
    code = cli.main(["study", *flags, "--settings", "two", "--out", str(tmp_path / "s"),
                     "--results", str(tmp_path / "r")])
    assert code == 2 and message in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "r").exists()


def test_proxy_model_halves_the_model_and_keeps_heads_dividing_the_width():
    for (width, layers, heads), expected in [((128, 2, 4), (64, 1, 2)), ((256, 4, 8), (128, 2, 4)),
                                             ((96, 3, 3), (48, 1, 1)), ((16, 1, 1), (8, 1, 1))]:
        small = study_module.proxy_model(TrainConfig(d_model=width, layers=layers, heads=heads))
        assert (small["d_model"], small["layers"], small["heads"]) == expected
        assert small["d_model"] % small["heads"] == 0


def test_proxy_mode_refuses_a_prior_of_its_own(monkeypatch, tmp_path, capsys):
    calls = _captured_calls(monkeypatch)
    monkeypatch.setattr(cli, "DEFAULT_CORPUS", str(tmp_path / "corpus"))
    code = cli.main(["study", "--proxy", "--prior", "0.5,0.5", "--settings", "two", "--out", str(tmp_path / "s"),
                     "--results", str(tmp_path / "r")])
    assert code == 2 and "do not also give prior or prior_run" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "r").exists()
    code = cli.main(["study", "--proxy", "--methods", "stratified", "--settings", "two", "--out",
                     str(tmp_path / "s"), "--results", str(tmp_path / "r")])
    assert code == 2 and "methods must include aioli" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "r").exists()
