"""The per-group evaluator against per-sequence cross-entropy computed independently in float64.

The group loss kernels land separately; these tests inject a pure-torch loss function with the kernels'
signature, and one test runs the real op once it exists.
"""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as functional

import aioli_ext
from aioli_ext.mixing import GroupEvaluator

F = torch.float64
VOCAB, WIDTH, LENGTH, GROUPS = 11, 8, 6, 3


def torch_group_cross_entropy(logits, targets, group_ids, num_groups, *, ignore_index=-100):
    """The kernels' contract in plain torch: per-token loss, fp32 group sums, int64 token counts."""
    flat_targets = targets.reshape(-1)
    flat_logits = logits.reshape(flat_targets.numel(), -1).float()
    if group_ids.numel() != flat_targets.numel():
        group_ids = group_ids.repeat_interleave(flat_targets.numel() // group_ids.numel())
    loss = functional.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="none")
    counted = flat_targets != ignore_index
    sums = torch.zeros(num_groups, dtype=torch.float32).index_add_(0, group_ids[counted], loss[counted])
    counts = torch.bincount(group_ids[counted], minlength=num_groups).to(torch.int64)
    return loss.view(targets.shape), sums, counts


def torch_group_linear_cross_entropy(hidden, weight, targets, group_ids, num_groups, *, bias=None,
                                     ignore_index=-100, chunk_size=None):
    return torch_group_cross_entropy(functional.linear(hidden, weight, bias), targets, group_ids, num_groups,
                                     ignore_index=ignore_index)


class TinyModel(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Embedding(VOCAB, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        self.dropout = torch.nn.Dropout(dropout)

    def hidden(self, input_ids):
        return self.dropout(self.embedding(input_ids))

    def forward(self, input_ids):
        return self.head(self.hidden(input_ids))


def validation_set(num_sequences=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (num_sequences, LENGTH), generator=generator)
    targets = torch.randint(0, VOCAB, (num_sequences, LENGTH), generator=generator)
    targets[torch.rand(num_sequences, LENGTH, generator=generator) < 0.2] = -100
    group_ids = torch.arange(num_sequences) % GROUPS
    return input_ids, targets, group_ids


def expected_losses(model, input_ids, targets, group_ids):
    """Mean token loss per group, one float64 cross-entropy over all of the group's counted tokens."""
    with torch.no_grad():
        logits = model(input_ids).double()
    result = []
    for group in range(GROUPS):
        rows = group_ids == group
        result.append(functional.cross_entropy(logits[rows].reshape(-1, VOCAB), targets[rows].reshape(-1),
                                               ignore_index=-100))
    return torch.stack(result)


def evaluator(*data, **kwargs):
    kwargs.setdefault("loss_fn", torch_group_cross_entropy)
    kwargs.setdefault("linear_loss_fn", torch_group_linear_cross_entropy)
    return GroupEvaluator(*data, GROUPS, **kwargs)


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_per_group_mean_token_loss(batch_size):
    data = validation_set()
    model = TinyModel()
    result = evaluator(*data, batch_size=batch_size)(model)
    assert result.dtype == F and result.shape == (GROUPS,) and result.device.type == "cpu"
    # fp32 per-token losses and per-batch sums: agreement to fp32 rounding.
    assert torch.allclose(result, expected_losses(model, *data), rtol=1e-6, atol=0)


def test_hidden_states_with_the_lm_head_match_logits():
    data = validation_set()
    model = TinyModel()
    by_logits = evaluator(*data, batch_size=4)(model)
    by_head = evaluator(*data, batch_size=4)(lambda ids: (model.hidden(ids), model.head))
    by_weight = evaluator(*data, batch_size=4)(
        lambda ids: (model.hidden(ids).reshape(-1, WIDTH), model.head.weight))
    assert torch.allclose(by_head, by_logits, rtol=1e-6, atol=0)
    # Without the bias the losses differ: the head's bias really is used above.
    without_bias = expected_losses(lambda ids: functional.linear(model.hidden(ids), model.head.weight), *data)
    assert torch.allclose(by_weight, without_bias, rtol=1e-6, atol=0)


def test_flat_logits_and_output_objects_are_accepted():
    data = validation_set()
    model = TinyModel()

    class Output:
        def __init__(self, logits):
            self.logits = logits

    reference = evaluator(*data, batch_size=4)(model)
    flat = evaluator(*data, batch_size=4)(lambda ids: model(ids).reshape(-1, VOCAB))
    wrapped = evaluator(*data, batch_size=4)(lambda ids: Output(model(ids)))
    assert torch.equal(flat, reference) and torch.equal(wrapped, reference)


def test_same_sequences_every_time_and_eval_mode_for_the_call():
    data = validation_set()
    model = TinyModel(dropout=0.5)
    model.train()
    scorer = evaluator(*data, batch_size=4)
    first, second = scorer(model), scorer(model)
    assert torch.equal(first, second)
    assert model.training
    assert torch.allclose(first, expected_losses(model.eval(), *data), rtol=1e-6, atol=0)
    assert scorer.last_token_counts.tolist() == scorer.tokens_per_group.tolist()


def test_low_precision_logits_are_accumulated_in_float():
    data = validation_set()
    model = TinyModel()
    result = evaluator(*data, batch_size=2)(lambda ids: model(ids).to(torch.bfloat16))
    expected = expected_losses(lambda ids: model(ids).to(torch.bfloat16).float(), *data)
    assert result.dtype == F
    assert torch.allclose(result, expected, rtol=1e-6, atol=0)


def test_from_group_sequences():
    generator = torch.Generator().manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (count, LENGTH + 1), generator=generator) for count in (2, 3, 1)]
    scorer = GroupEvaluator.from_group_sequences(sequences, loss_fn=torch_group_cross_entropy, batch_size=4)
    model = TinyModel()
    tokens = torch.cat(sequences)
    group_ids = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.allclose(scorer(model), expected_losses(model, tokens[:, :-1], tokens[:, 1:], group_ids),
                          rtol=1e-6, atol=0)
    assert scorer.tokens_per_group.tolist() == [2 * LENGTH, 3 * LENGTH, LENGTH]


def test_bad_inputs_fail_with_clear_messages():
    input_ids, targets, group_ids = validation_set()
    empty = targets.clone()
    empty[group_ids == 1] = -100
    with pytest.raises(ValueError, match=r"groups \[1\] have no counted validation tokens"):
        evaluator(input_ids, empty, group_ids)
    with pytest.raises(ValueError, match=r"group_ids must be in \[0, num_groups\) = \[0, 3\)"):
        evaluator(input_ids, targets, group_ids + 1)
    with pytest.raises(ValueError, match=r"targets must be a tensor of the shape of input_ids"):
        evaluator(input_ids, targets[:, :-1], group_ids)
    with pytest.raises(ValueError, match=r"group_ids must be a tensor \[N\] = \[10\]"):
        evaluator(input_ids, targets, group_ids[:-1])
    with pytest.raises(TypeError, match=r"input_ids must be int64"):
        evaluator(input_ids.int(), targets, group_ids)
    scorer = evaluator(input_ids, targets, group_ids, batch_size=4)
    with pytest.raises(ValueError, match=r"forward returned logits of shape \(4, 5, 11\); expected \[4, 6, V\]"):
        scorer(lambda ids: TinyModel()(ids)[:, :-1])
    with pytest.raises(TypeError, match=r"forward must return logits \(a tensor\) or a tuple"):
        scorer(lambda ids: "logits")


def test_one_all_reduce_per_evaluation(monkeypatch):
    data = validation_set()
    model = TinyModel()
    expected = evaluator(*data)(model)
    calls = []
    original = torch.distributed.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append((tensor.dtype, tuple(tensor.shape)))
        return original(tensor, *args, **kwargs)

    with tempfile.TemporaryDirectory() as directory:
        torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'store')}",
                                             rank=0, world_size=1)
        try:
            monkeypatch.setattr(torch.distributed, "all_reduce", counting_all_reduce)
            result = evaluator(*data, batch_size=3)(model)
        finally:
            torch.distributed.destroy_process_group()
    assert calls == [(F, (2 * GROUPS,))]
    assert torch.allclose(result, expected, rtol=1e-6, atol=0)


def _distributed_worker(rank, world_size, store, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        data = validation_set(num_sequences=7)
        scorer = evaluator(*data, batch_size=2)
        torch.save({"losses": scorer(TinyModel()), "counts": scorer.last_token_counts},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_score_disjoint_shards_and_agree():
    data = validation_set(num_sequences=7)
    single = evaluator(*data, batch_size=2)
    expected = single(TinyModel())
    with tempfile.TemporaryDirectory() as directory:
        torch.multiprocessing.spawn(_distributed_worker, args=(2, os.path.join(directory, "store"), directory),
                                    nprocs=2, join=True)
        results = [torch.load(os.path.join(directory, f"rank{rank}.pt")) for rank in range(2)]
    for result in results:
        assert torch.equal(result["counts"], single.last_token_counts)
        assert torch.allclose(result["losses"], expected, rtol=1e-6, atol=0)
    assert torch.equal(results[0]["losses"], results[1]["losses"])


@pytest.mark.skipif(not hasattr(aioli_ext, "group_cross_entropy"),
                    reason="aioli_ext.group_cross_entropy is not built into this checkout yet")
def test_default_loss_is_the_group_cross_entropy_kernel():
    data = validation_set()
    model = TinyModel()
    result = GroupEvaluator(*data, GROUPS, batch_size=3)(model)
    assert torch.allclose(result, expected_losses(model, *data), rtol=1e-5, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batches_and_nccl_reduce():
    data = validation_set()
    model = TinyModel()
    expected = evaluator(*data, batch_size=3)(model)
    model = model.cuda()
    with tempfile.TemporaryDirectory() as directory:
        torch.distributed.init_process_group("nccl", init_method=f"file://{os.path.join(directory, 'store')}",
                                             rank=0, world_size=1)
        try:
            result = evaluator(*data, batch_size=3, device="cuda")(model)
        finally:
            torch.distributed.destroy_process_group()
    assert result.device.type == "cpu" and result.dtype == F
    assert torch.allclose(result, expected, rtol=1e-5, atol=0)
