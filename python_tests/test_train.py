"""The training CLI and loop: every method end to end on a tiny corpus, exact resume, drawn-group frequencies,
and bad input (each a clear error, nothing written)."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from aioli_ext.__main__ import main as cli
from aioli_ext.data import write_token_store
from aioli_ext.train import RunError, TrainConfig, compare, t_interval, train
from aioli_ext.train.compare import markdown
from aioli_ext.train.config import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(kind, count, seed):
    rng = np.random.default_rng(seed)
    if kind == "words":
        vocab = ["the", "model", "learns", "data", "mixing", "of", "groups", "\n"]
        return [" ".join(rng.choice(vocab, size=80)) for _ in range(count)]
    if kind == "hex":
        return ["\n".join("".join(rng.choice(list("0123456789abcdef"), size=32)) for _ in range(6))
                for _ in range(count)]
    return ["".join(f"x{i} = {i * 7 % 13}\n" for i in range(j, j + 20)) for j in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "store"
    plan = {name: (_texts(kind, 60, seed), {"kind": "test"})
            for seed, (name, kind) in enumerate([("prose", "words"), ("code", "code"), ("noise", "hex")])}
    write_token_store(str(out), plan, None, 0.15, 0.15, "test-salt", 2048, False)
    return str(out)


def tiny(corpus, out, **changes):
    settings = dict(corpus=corpus, context=16, d_model=16, layers=1, heads=2, batch=8, steps=24, warmup=2,
                    update_steps=12, lp_sweeps=1, lp_steps=2, eval_windows=4, eval_batch=8, eval_every=6,
                    test_windows=8, checkpoint_every=5, out=str(out), progress=False)
    settings.update(changes)
    return TrainConfig(**settings)


@pytest.mark.parametrize("method, extra", [
    ("aioli", {}), ("stratified", {}), ("static", {"proportions": [0.6, 0.3, 0.1]}),
    ("skillit", {}), ("doremi", {"reference_losses": [2.0, 1.0, 2.7]})])
def test_every_method_trains_end_to_end(corpus, tmp_path, method, extra):
    result = train(tiny(corpus, tmp_path / method, method=method, **extra))
    assert result["groups"] == ["prose", "code", "noise"]
    assert len(result["train_loss"]) == 24 and all(math.isfinite(x) for x in result["train_loss"])
    # Training from scratch on byte tokens must beat the uniform guess (ln 257 = 5.55 nats) within 24 steps.
    assert max(result["test_loss"]) < math.log(257)
    assert result["avg_test_ppl"] == pytest.approx(sum(math.exp(x) for x in result["test_loss"]) / 3)
    saved = json.load(open(tmp_path / method / "result.json"))
    assert saved["test_ppl"] == result["test_ppl"]
    assert os.path.getsize(tmp_path / method / "run.png") > 1000
    assert not (tmp_path / method / "checkpoint.pt").exists()
    # Evaluations: Aioli's rounds need 1 + k*m per round; the static ones need none.
    expected = {"aioli": 2 * (1 + 3) + 0, "stratified": 0, "static": 0, "skillit": 2, "doremi": 2}[method]
    assert result["evaluations"] >= expected


def _same_run(a, b):
    for key in ("train_loss", "test_loss", "final_val_loss", "val_curve", "proportions", "mixing_log"):
        assert a[key] == b[key], key


def test_stop_and_resume_is_bit_exact(corpus, tmp_path):
    whole = train(tiny(corpus, tmp_path / "whole"))
    for stop in (1, 7, 12, 13, 23):
        cfg = tiny(corpus, tmp_path / f"part{stop}")
        assert train(cfg, stop_at_step=stop) is None
        assert (tmp_path / f"part{stop}" / "checkpoint.pt").exists()
        resumed = train(cfg, resume=True)
        _same_run(whole, resumed)


def test_resume_refuses_other_settings(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run")
    train(cfg, stop_at_step=6)
    with pytest.raises(RunError, match=r"other settings \(eta: 0.3 -> 0.5\)"):
        train(cfg.replace(eta=0.5), resume=True)
    with pytest.raises(RunError, match="already holds a run; pass --resume"):
        train(cfg)


def test_lp_base_reaches_the_mixer_and_old_checkpoints_resume(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run", lp_base="mixture", prior=[0.6, 0.3, 0.1], prior_steps=4, update_steps=10,
               one_hot=0.6)
    whole = train(cfg.replace(out=str(tmp_path / "whole")))
    # The first round's sub-phases: 0.6·prior + 0.4·e_j (c = (3·0.6 − 1)/2).
    first = [entry for entry in whole["mixing_log"]["phases"] if entry["label"] == "learn_params"][:3]
    for entry in first:
        expected = [0.6 * x + (0.4 if j == entry["group"] else 0.0) for j, x in enumerate([0.6, 0.3, 0.1])]
        assert entry["proportions"] == pytest.approx(expected, abs=1e-12)
    # A checkpoint written before lp_base existed (its settings lack the key) resumes as the uniform base.
    old = tiny(corpus, tmp_path / "old")
    train(old, stop_at_step=7)
    path = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    del state["settings"]["lp_base"]
    del state["mixer"]["config"]["lp_base"]
    torch.save(state, path)
    with pytest.raises(RunError, match=r"other settings \(lp_base: 'uniform' -> 'mixture'\)"):
        train(old.replace(lp_base="mixture"), resume=True)
    # Only settings listed as added later get that treatment: any other missing setting is a change.
    torch.save({**state, "settings": {k: v for k, v in state["settings"].items() if k != "eta"}}, path)
    with pytest.raises(RunError, match=r"other settings \(eta: None -> 0.3\)"):
        train(old, resume=True)
    torch.save(state, path)
    _same_run(train(old.replace(out=str(tmp_path / "old-whole"))), train(old, resume=True))


def test_resume_of_a_finished_run_returns_it_only_for_the_same_settings(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "run")
    whole = train(cfg)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # The same settings: the stored result, without training again (run-control fields may change).
    before = (tmp_path / "run" / "result.json").read_bytes()
    again = train(cfg.replace(threads=2, progress=False), resume=True)
    _same_run(whole, again)
    assert (tmp_path / "run" / "result.json").read_bytes() == before
    # Other numbers-changing settings: refused, and the stored result is left as it was.
    with pytest.raises(RunError, match=r"result.json was made with other settings \(eta: 0.3 -> 0.5\)"):
        train(cfg.replace(eta=0.5), resume=True)
    assert (tmp_path / "run" / "result.json").read_bytes() == before
    # Another method's mixer settings do not change a stratified run's numbers, so they do not block a resume.
    strat = tiny(corpus, tmp_path / "strat", method="stratified")
    first = train(strat)
    _same_run(first, train(strat.replace(one_hot=0.5, eta=2.0, lp_steps=3), resume=True))
    with pytest.raises(RunError, match=r"other settings \(lr: "):
        train(strat.replace(lr=1e-3), resume=True)
    (tmp_path / "run" / "result.json").write_text("{not json")
    with pytest.raises(RunError, match=r"--resume: cannot read .*result.json"):
        train(cfg, resume=True)


def test_killed_process_resumes_to_the_same_numbers(corpus, tmp_path):
    args = ["--corpus", corpus, "--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
            "--batch", "8", "--steps", "40", "--warmup", "2", "--update-steps", "12", "--lp-sweeps", "1",
            "--lp-steps", "2", "--eval-windows", "4", "--eval-batch", "8", "--eval-every", "6",
            "--test-windows", "8", "--checkpoint-every", "3", "--no-progress", "--groups", "prose,code,noise"]
    assert cli(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "aioli_ext", "train", *args, "--out", str(out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert checkpoint.exists() and not (out / "result.json").exists(), "the run finished before it was killed"
    assert cli(["train", *args, "--out", str(out), "--resume"]) == 0
    _same_run(json.load(open(tmp_path / "whole" / "result.json")), json.load(open(out / "result.json")))


def test_drawn_groups_follow_the_mixers_proportions(corpus, tmp_path):
    # Static: the exact counts realise 0.7/0.2/0.1 over every block of 64 steps (512 slots), so after 64 steps
    # the drawn shares equal the proportions to within one slot per group (1/512).
    cfg = tiny(corpus, tmp_path / "static", method="static", proportions=[0.7, 0.2, 0.1], steps=64)
    result = train(cfg)
    assert np.allclose(result["drawn_share"], [0.7, 0.2, 0.1], atol=1 / 512 + 1e-12)
    # Aioli: every finite phase (LearnParams sub-phases with their smoothed one-hot mixture, and the mixing part
    # of each round) is realised to within one sample per group over the phase.
    cfg = tiny(corpus, tmp_path / "aioli", steps=24)
    run_result = train(cfg)
    counts = np.array(run_result["drawn_counts"])
    assert counts.shape == (24, 3) and np.all(counts.sum(1) == 8)
    for phase in run_result["mixing_log"]["phases"]:
        if phase["stop"] is None or phase["stop"] <= phase["start"]:
            continue
        drawn = counts[phase["start"]:phase["stop"]].sum(0)
        slots = (phase["stop"] - phase["start"]) * 8
        assert np.all(np.abs(drawn - np.array(phase["proportions"]) * slots) < 1.0 + 1e-9), phase


def test_iid_sampler_frequencies_follow_proportions(corpus, tmp_path):
    # i.i.d. mode draws each slot's group independently: over 100 steps x 8 slots, the share of a group with
    # p = 0.5 has sd sqrt(0.25 / 800) = 0.018; 5 sd = 0.09 bounds a false failure far below 1e-5.
    cfg = tiny(corpus, tmp_path / "iid", method="static", proportions=[0.5, 0.3, 0.2], steps=100,
               sampler_mode="iid", eval_every=50)
    result = train(cfg)
    assert np.allclose(result["drawn_share"], [0.5, 0.3, 0.2], atol=0.09)


def test_compare_is_paired_and_independent_of_jobs(corpus, tmp_path):
    base = tiny(corpus, tmp_path, steps=14, update_steps=12)
    one = compare(base, ["stratified", "aioli"], [0, 1], jobs=1, out=str(tmp_path / "one"), progress=False)
    two = compare(base, ["stratified", "aioli"], [0, 1], jobs=2, out=str(tmp_path / "two"), progress=False)
    def numbers(summary):
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in summary["runs"]]

    assert numbers(one) == numbers(two)
    paired = one["methods"]["aioli"]["paired"]
    by = {(r["method"], r["seed"]): r["avg_test_ppl"] for r in one["runs"]}
    assert paired["differences"] == [by[("aioli", s)] - by[("stratified", s)] for s in (0, 1)]
    for name in ("compare.json", "compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "one" / name).stat().st_size > 100
    # Same seed, same first step: the two methods share initial weights and evaluation set.
    a = json.load(open(tmp_path / "one" / "stratified-s0" / "result.json"))
    b = json.load(open(tmp_path / "one" / "aioli-s0" / "result.json"))
    assert a["val_curve"][0] == b["val_curve"][0]
    with pytest.raises(RunError, match="already holds runs"):
        compare(base, ["stratified", "aioli"], [0, 1], jobs=1, out=str(tmp_path / "one"), progress=False)


def test_t_interval_matches_the_t_distribution():
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    # sd 1, n 3: half-width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051.
    assert mean == 2.0 and high - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert low == pytest.approx(2 * mean - high)


def test_markdown_table_has_paired_row():
    summary = {"groups": ["a", "b"], "baseline": "stratified", "methods": {
        "stratified": {"seeds": [0, 1], "mean": 10.0, "sd": 0.5, "per_group_mean": [9.0, 11.0],
                       "final_proportions_mean": [0.5, 0.5]},
        "aioli": {"seeds": [0, 1], "mean": 9.0, "sd": 0.4, "per_group_mean": [8.0, 10.0],
                  "final_proportions_mean": [0.8, 0.2],
                  "paired": {"seeds": [0, 1], "differences": [-1.0, -1.0], "mean": -1.0, "ci95": [-1.0, -1.0],
                             "wins": 2},
                  "paired_val": {"mean": -0.5, "ci95": [-0.6, -0.4]}}}}
    text = markdown(summary)
    assert "| aioli | 8.000 | 10.000 | **9.000** ± 0.400 | 0.80/0.20 |" in text
    assert "| aioli | 2 | **-1.000 [-1.000, -1.000]** | 2/2 | -1.000, -1.000 |" in text


# ------------------------------------------------------------------------------------------------- bad input

def _nothing_written(path):
    return not os.path.exists(path)


def test_missing_and_empty_group_folders_are_clear_errors(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "good").mkdir(parents=True)
    (src / "good" / "a.txt").write_text("some text " * 100)
    (src / "empty").mkdir()
    out = tmp_path / "store"
    assert cli(["prepare", "prepare-folders", str(out), f"good={src / 'good'}", f"ghost={src / 'ghost'}"]) == 2
    err = capsys.readouterr().err
    assert "group 'ghost'" in err and "does not exist" in err
    assert _nothing_written(out)
    assert cli(["prepare", "prepare-folders", str(out), f"good={src / 'good'}", f"empty={src / 'empty'}"]) == 2
    assert "holds no non-empty .txt or .jsonl file" in capsys.readouterr().err
    assert _nothing_written(out)


def test_corrupt_token_file_is_a_clear_error(corpus, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    with open(broken / "code" / "train.bin", "r+b") as handle:
        handle.truncate(os.path.getsize(broken / "code" / "train.bin") - 3)
    out = tmp_path / "run"
    assert cli(["train", "--corpus", str(broken), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "group 'code' split 'train'" in err and "the file is corrupt" in err
    assert _nothing_written(out)


@pytest.mark.parametrize("flags, message", [
    (["--method", "magic"], "argument --method: invalid choice: 'magic'"),
    (["--one-hot", "fast"], "argument --one-hot: invalid float value: 'fast'"),
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag 1"),
    (["--sampler-mode", "random"], "argument --sampler-mode: invalid choice: 'random'"),
    (["--lp-base", "current"], "argument --lp-base: invalid choice: 'current'"),
])
def test_unknown_method_or_flag_is_a_usage_error(corpus, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "--corpus", corpus, "--out", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("flags, message", [
    (["--one-hot", "1.5"], r"one_hot must be <= 1.0, got 1.5"),
    (["--eta", "0"], r"eta must be > 0.0, got 0.0"),
    (["--lp-sweeps", "4", "--lp-steps", "8", "--update-steps", "50"], r"must be fewer than update_steps = 50"),
    (["--groups", "code,ghost"], r"groups \['ghost'\] are not in the token store"),
    (["--method", "static"], r"method 'static' needs proportions"),
    (["--method", "static", "--proportions", "0.5,0.5"], r"proportions must hold 3 finite numbers"),
    (["--one-hot", "0.3333333333333333"], r"one_hot"),
])
def test_bad_setting_values_are_clear_errors(corpus, tmp_path, capsys, flags, message):
    assert cli(["train", "--corpus", corpus, "--out", str(tmp_path / "run"), "--no-progress", *flags]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert _nothing_written(tmp_path / "run")


def test_config_file_sets_every_aioli_setting_and_flags_win(corpus, tmp_path):
    from aioli_ext.__main__ import build_parser, config_from_args
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"eta": 0.7, "one_hot": 0.9, "lp_sweeps": 3, "lp_steps": 5, "update_steps": 250,
                                "ema": 0.5, "diagonal": True, "prior": [0.2, 0.8], "prior_steps": 100,
                                "lp_base": "mixture"}))
    args = build_parser().parse_args(["train", "--config", str(path), "--eta", "0.2"])
    cfg = config_from_args(args)
    assert (cfg.eta, cfg.one_hot, cfg.lp_sweeps, cfg.lp_steps, cfg.update_steps) == (0.2, 0.9, 3, 5, 250)
    assert (cfg.ema, cfg.diagonal, cfg.prior, cfg.prior_steps, cfg.lp_base) == (0.5, True, [0.2, 0.8], 100, "mixture")
    path.write_text(json.dumps({"lp_base": "current"}))
    with pytest.raises(ValueError, match=r"lp_base must be one of \['uniform', 'mixture'\], got 'current'"):
        validate(config_from_args(build_parser().parse_args(["train", "--config", str(path)])))
    path.write_text(json.dumps({"etta": 1}))
    with pytest.raises(ValueError, match=r"unknown settings \['etta'\]"):
        config_from_args(build_parser().parse_args(["train", "--config", str(path)]))


@pytest.fixture(scope="module")
def proxy_runs(corpus, tmp_path_factory):
    """Finished Aioli runs of a smaller model for seeds 0 and 1: the proxies that prior_run names."""
    root = tmp_path_factory.mktemp("proxy")
    for seed in (0, 1):
        train(tiny(corpus, root / f"proxy-s{seed}", seed=seed, d_model=8, eta=2.0))
    return root


def test_prior_run_starts_aioli_from_the_proxys_last_mixture(corpus, proxy_runs, tmp_path):
    for seed in (0, 1):
        proxy = json.load(open(proxy_runs / f"proxy-s{seed}" / "result.json"))
        last = proxy["proportions"][-1]
        assert max(last) - min(last) > 0.02  # the proxy moved away from uniform, so the test can tell them apart
        named = train(tiny(corpus, tmp_path / f"named-s{seed}", seed=seed,
                           prior_run=str(proxy_runs / "proxy-s{seed}")))
        given = train(tiny(corpus, tmp_path / f"given-s{seed}", seed=seed, prior=last))
        _same_run(named, given)
        assert named["mixer_config"]["prior"] == pytest.approx(last, abs=1e-12)
        assert named["settings"]["prior_run"] == str(proxy_runs / "proxy-s{seed}")
    # The result.json path works as well as the folder.
    direct = train(tiny(corpus, tmp_path / "direct", seed=1,
                        prior_run=str(proxy_runs / "proxy-s1" / "result.json")))
    _same_run(direct, json.load(open(tmp_path / "named-s1" / "result.json")))


def test_resume_refuses_a_prior_run_that_changed_since_the_run_started(corpus, proxy_runs, tmp_path):
    proxy = tmp_path / "proxy"
    proxy.mkdir()
    result = json.load(open(proxy_runs / "proxy-s0" / "result.json"))
    (proxy / "result.json").write_text(json.dumps(result))
    cfg = tiny(corpus, tmp_path / "run", prior_run=str(proxy))
    assert train(cfg, stop_at_step=7) is None
    # The same file: the run resumes and equals an uninterrupted one.
    _same_run(train(cfg, resume=True), train(cfg.replace(out=str(tmp_path / "whole"))))
    assert train(cfg.replace(out=str(tmp_path / "part")), stop_at_step=7) is None
    result["proportions"][-1] = [0.5, 0.25, 0.25]  # the proxy was run again and ended elsewhere
    (proxy / "result.json").write_text(json.dumps(result))
    with pytest.raises(RunError, match=r"--resume: prior_run '.*proxy' now holds the mixture \[0\.5, 0\.25, 0\.25\], "
                                       r"but .*part.checkpoint\.pt started from \[0\.\d+, "):
        train(cfg.replace(out=str(tmp_path / "part")), resume=True)


def test_reference_run_gives_doremi_the_runs_final_validation_losses(corpus, proxy_runs, tmp_path):
    proxy = json.load(open(proxy_runs / "proxy-s1" / "result.json"))
    named = train(tiny(corpus, tmp_path / "named", method="doremi", seed=1,
                       reference_run=str(proxy_runs / "proxy-s{seed}")))
    given = train(tiny(corpus, tmp_path / "given", method="doremi", seed=1,
                       reference_losses=proxy["final_val_loss"]))
    _same_run(named, given)


@pytest.mark.parametrize("flags, message", [
    (["--prior-run", "{root}/ghost"], r"prior_run: '.*ghost' does not exist \(give a finished run's folder"),
    (["--prior-run", "{root}/proxy-s{{seed}}", "--seed", "2"], r"prior_run: '.*proxy-s2' does not exist"),
    (["--prior-run", "{root}/proxy-s0", "--prior", "0.2,0.3,0.5"], r"give prior or prior_run .* not both"),
    (["--prior-run", "{root}/proxy-s0", "--groups", "code,prose,noise"],
     r"prior_run: .* has groups \['prose', 'code', 'noise'\], this run has \['code', 'prose', 'noise'\]"),
    (["--prior-run", "{root}/proxy-s0", "--groups", "code,noise"], r"prior_run: .* has groups"),
    (["--prior-run", "{root}/broken"], r"prior_run: '.*broken.result\.json' is not the result\.json of a finished"),
    (["--method", "doremi", "--reference-run", "{root}/ghost"], r"reference_run: '.*ghost' does not exist"),
    (["--prior-run", "{root}/nomix"], r"prior_run: '.*nomix.result\.json' holds no 'proportions'"),
    (["--prior-run", " "], r"prior_run must be the path of a finished run"),
])
def test_bad_prior_or_reference_run_is_a_clear_error(corpus, proxy_runs, tmp_path, capsys, flags, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "result.json").write_text('{"groups": ')
    (tmp_path / "nomix").mkdir()
    (tmp_path / "nomix" / "result.json").write_text(json.dumps({"groups": ["prose", "code", "noise"]}))
    root = str(proxy_runs)
    flags = [f.replace("{root}", str(tmp_path) if "broken" in f or "nomix" in f else root).replace("{{seed}}", "{seed}")
             for f in flags]
    assert cli(["train", "--corpus", corpus, "--out", str(tmp_path / "run"), "--no-progress", *flags]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert _nothing_written(tmp_path / "run")


def test_compare_checks_every_seeds_prior_run_before_writing(corpus, proxy_runs, tmp_path):
    base = tiny(corpus, tmp_path, prior_run=str(proxy_runs / "proxy-s{seed}"))
    with pytest.raises(RunError, match=r"prior_run: '.*proxy-s2' does not exist"):
        compare(base, ["stratified", "aioli"], [0, 1, 2], jobs=1, out=str(tmp_path / "cmp"), progress=False)
    assert _nothing_written(tmp_path / "cmp")
    # A method that does not read prior_run ignores it (stratified has no seed 2 proxy to check).
    compare(base.replace(steps=14), ["stratified"], [2], jobs=1, out=str(tmp_path / "strat"), progress=False)
    assert (tmp_path / "strat" / "stratified-s2" / "result.json").exists()


def test_method_settings_name_config_fields_and_every_method():
    from aioli_ext.train.config import FIELDS, METHOD_SETTINGS, METHODS
    assert set(METHOD_SETTINGS) == set(METHODS)
    for method, names in METHOD_SETTINGS.items():
        assert set(names) <= set(FIELDS), (method, set(names) - set(FIELDS))
        kept = TrainConfig(method=method).numeric_settings()
        assert set(names) <= set(kept)
