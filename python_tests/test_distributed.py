"""Data-parallel training on the CPU (gloo): two ranks started by torchrun against one process.

One torchrun launch (python_tests/distributed_worker.py, 2 ranks) draws sampler slices, scores an uneven
evaluation split, trains a tiny run, stops another at step 13, and resumes at 2 ranks a run that one process
stopped at step 7; this process then resumes the 2-rank checkpoint alone. The ranks must agree with each other
bit for bit (their decisions come from the same all-reduced bits), and with one process within float
tolerance: the reduction order of the gradients and statistics differs, nothing else does.
"""
import json
import math
import os
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from aioli_ext import distributed
from aioli_ext.mixing import GroupEvaluator
from aioli_ext.sampler import MixtureSampler
from aioli_ext.train import TrainConfig, train
from aioli_ext.train.checkpoint import load_checkpoint
from aioli_ext.train.compare import compare
from aioli_ext.train.loop import RunError

import distributed_worker as worker
from test_train import corpus, tiny  # noqa: F401 (corpus is a fixture: the same tiny 3-group store)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 300
STOP_AT_TWO_RANKS = 13
STOP_AT_ONE_RANK = 7
# The 2-rank run sums each gradient and each group statistic in another order than one process (fp32 terms,
# ~1e-7 relative each). Over 24 AdamW steps the losses measured here stay within 2e-7 relative of the single
# process and the proportions within 1e-7; the bounds leave a factor of ~50.
LOSS_RTOL = 1e-5
PROPORTION_ATOL = 5e-6


def _settings(corpus):
    """test_train's tiny run (3 groups, Aioli, 24 steps, global batch 8) as TrainConfig fields."""
    settings = tiny(corpus, "unused").to_dict()
    del settings["out"]
    return settings


def _launch(spec_path, out_dir):
    """torchrun with 2 CPU ranks; the whole process group is killed if it outlives LAUNCH_TIMEOUT_S."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "python_tests", "distributed_worker.py"), spec_path, out_dir]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_TIMEOUT_S} s:\n{output.decode()[-4000:]}")
    assert process.returncode == 0, f"torchrun failed:\n{output.decode()[-4000:]}"


@pytest.fixture(scope="module")
def launched(corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    cfg = TrainConfig(**_settings(corpus))
    folders = {name: str(base / name) for name in ("single", "two", "stop_two", "stop_one")}
    with worker.recorded_runs() as runs:
        single = train(cfg.replace(out=folders["single"]))
        single_state = worker.snapshot(runs[-1])
        assert train(cfg.replace(out=folders["stop_one"]), stop_at_step=STOP_AT_ONE_RANK) is None
    spec = {"settings": _settings(corpus), "full": folders["two"], "stop": folders["stop_two"],
            "stop_at": STOP_AT_TWO_RANKS, "resume": folders["stop_one"]}
    spec_path = str(base / "spec.json")
    with open(spec_path, "w") as handle:
        json.dump(spec, handle)
    _launch(spec_path, str(base))
    ranks = [torch.load(str(base / f"rank{r}.pt")) for r in range(2)]
    checkpoint_two = load_checkpoint(os.path.join(folders["stop_two"], "checkpoint.pt"))
    resumed_alone = train(cfg.replace(out=folders["stop_two"]), resume=True)
    return types.SimpleNamespace(cfg=cfg, single=single, single_state=single_state, ranks=ranks,
                                 folders=folders, checkpoint_two=checkpoint_two, resumed_alone=resumed_alone)


def _assert_identical(a, b, where="state"):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != {b!r}"


def _assert_same_run(expected, actual):
    """One process (expected) against a data-parallel run or a resume that crossed world sizes (actual)."""
    for key in ("train_loss", "test_loss", "final_val_loss"):
        np.testing.assert_allclose(actual[key], expected[key], rtol=LOSS_RTOL, atol=0, err_msg=key)
    assert [v["step"] for v in actual["val_curve"]] == [v["step"] for v in expected["val_curve"]]
    np.testing.assert_allclose([v["losses"] for v in actual["val_curve"]],
                               [v["losses"] for v in expected["val_curve"]], rtol=LOSS_RTOL, atol=0)
    np.testing.assert_allclose(actual["proportions"], expected["proportions"], rtol=0, atol=PROPORTION_ATOL)
    # The proportions become integer group counts per step; the tiny differences above flip none of them here,
    # so the very same samples are drawn.
    assert actual["drawn_counts"] == expected["drawn_counts"]
    assert actual["evaluations"] == expected["evaluations"]
    assert [(p["start"], p["stop"], p["label"]) for p in actual["mixing_log"]["phases"]] == \
        [(p["start"], p["stop"], p["label"]) for p in expected["mixing_log"]["phases"]]


# --------------------------------------------------------------------------------- without a process group

def test_helpers_without_a_process_group(monkeypatch):
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    distributed.barrier()
    values = torch.tensor([1.5, 2.0], dtype=torch.float64)
    reduced = distributed.all_reduce_sum(values)
    assert torch.equal(reduced, values) and reduced.data_ptr() != values.data_ptr()
    with pytest.raises(ValueError, match=r"values must be a 1-D float64 tensor, got torch.float32"):
        distributed.all_reduce_sum(values.float())
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE environment variable must be an integer, got 'two'"):
        distributed.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.process_group_from_env("cpu") as device:
        assert device == torch.device("cpu") and not distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE is 2 but RANK is not set: start the processes with torchrun"):
        with distributed.process_group_from_env("cpu"):
            pass
    with pytest.raises(ValueError, match=r"device_type must be 'cpu' or 'cuda', got 'tpu'"):
        with distributed.process_group_from_env("tpu"):
            pass


def test_bad_device_setting_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match=r"device must be 'cpu' or 'cuda'.*got 'gpu'"):
        train(TrainConfig(corpus=str(tmp_path), out=str(tmp_path / "run"), device="gpu"))
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    from aioli_ext.__main__ import main as cli
    assert cli(["train", "--corpus", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "error: device is 'cuda' but torch sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_compare_refuses_to_run_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RunError, match=r"compare runs its own worker processes and cannot run under torchrun"):
        compare(TrainConfig(corpus=str(tmp_path)), ["stratified"], [0], out=str(tmp_path / "cmp"), progress=False)


# ------------------------------------------------------------------------------------- two ranks (torchrun)

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["systematic", "iid"])
def test_rank_slices_are_disjoint_and_complete(launched, mode):
    single = worker.sampler_draws(0, 1, mode)
    slices = [rank["sampler"][mode] for rank in launched.ranks]
    for step, (ids, groups) in enumerate(zip(single["ids"], single["groups"])):
        half = worker.SAMPLER_BATCH // 2
        for rank, seen in enumerate(slices):
            # Rank r holds slots [r * B / 2, (r + 1) * B / 2) of the global batch: disjoint slots, and together
            # exactly the single-process batch.
            assert torch.equal(seen["ids"][step], ids[rank * half:(rank + 1) * half]), (mode, step, rank)
            assert torch.equal(seen["groups"][step], groups[rank * half:(rank + 1) * half]), (mode, step, rank)
    for seen in slices:
        # The state is the global stream's (cursors advanced by the whole batch), the same on every rank.
        _assert_identical(seen["state"], single["state"])


@pytest.mark.slow
def test_uneven_evaluation_shards_reduce_to_the_single_process_statistics(launched):
    # 7 sequences over 2 ranks: rank 0 scores 4, rank 1 scores 3.
    scorer = GroupEvaluator(*worker.evaluation_set(), 3, batch_size=2)
    expected = scorer(worker.evaluation_model())
    for rank in launched.ranks:
        seen = rank["evaluator"]
        assert torch.equal(seen["counts"], scorer.last_token_counts)
        # fp32 batch sums over other batches: within 1e-6 relative.
        torch.testing.assert_close(seen["sums"], scorer.last_loss_sums, rtol=1e-6, atol=0)
        torch.testing.assert_close(seen["losses"], expected, rtol=1e-6, atol=0)
    _assert_identical(launched.ranks[0]["evaluator"], launched.ranks[1]["evaluator"])


@pytest.mark.slow
def test_ranks_hold_identical_state(launched):
    first, second = launched.ranks
    assert (first["rank"], second["rank"], first["world_size"]) == (0, 1, 2)
    for name in ("full", "stop", "resume"):
        _assert_identical(first[name], second[name], name)
    for name in ("full_result", "resume_result"):
        untimed = [{k: v for k, v in rank[name].items() if k != "train_seconds"} for rank in (first, second)]
        _assert_identical(*untimed, name)


@pytest.mark.slow
def test_two_ranks_reach_the_single_process_numbers(launched):
    two = launched.ranks[0]["full_result"]
    _assert_same_run(launched.single, two)
    # Only rank 0 writes, and it writes what every rank returned.
    with open(os.path.join(launched.folders["two"], "result.json")) as handle:
        assert json.load(handle)["train_loss"] == two["train_loss"]
    assert not os.path.exists(os.path.join(launched.folders["two"], "checkpoint.pt"))
    # The global stream itself is the single process's: same sampler state after the run, same mixer
    # decisions (its state within float tolerance of the single process's).
    _assert_identical(launched.ranks[0]["full"]["sampler"], launched.single_state["sampler"])
    # AdamW steps a coordinate whose gradient is only rounding noise by up to ~lr (6e-3) whatever the noise's
    # size, so single weights can differ by more than the losses do: 1e-5 measured here, 2e-4 allowed.
    single_model, two_model = launched.single_state["model"], launched.ranks[0]["full"]["model"]
    for name in single_model:
        torch.testing.assert_close(two_model[name], single_model[name], rtol=0, atol=2e-4)


@pytest.mark.slow
def test_odd_global_batch_is_refused_on_every_rank(launched):
    for rank in launched.ranks:
        assert rank["odd_batch_error"] == ("batch (9) is the global batch and must be divisible by the number "
                                           "of processes (2)")


@pytest.mark.slow
def test_resume_with_another_world_size(launched):
    # Saved by 2 ranks at step 13 (by rank 0 alone, with no rank-specific state), resumed by one process.
    assert launched.checkpoint_two["step"] == STOP_AT_TWO_RANKS and launched.checkpoint_two["world_size"] == 2
    _assert_same_run(launched.single, launched.resumed_alone)
    _assert_same_run(launched.ranks[0]["full_result"], launched.resumed_alone)
    # Saved by one process at step 7, resumed by 2 ranks.
    resumed_two = launched.ranks[0]["resume_result"]
    assert launched.ranks[0]["stop"]["step"] == STOP_AT_TWO_RANKS
    _assert_same_run(launched.single, resumed_two)
