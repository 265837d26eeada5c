"""The small GPT: shapes, causal masking, deterministic initialisation, configuration errors."""
import pytest
import torch

from aioli_ext.model import GPT, GPTConfig, group_lm_loss

SMALL = GPTConfig(vocab_size=61, context_length=24, d_model=32, n_layers=2, n_heads=4)


def test_shapes_and_head():
    model = GPT(SMALL, seed=0)
    tokens = torch.randint(0, SMALL.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    hidden = model(tokens)
    assert hidden.shape == (3, 17, SMALL.d_model) and hidden.dtype == torch.float32
    logits = model.logits(hidden)
    assert logits.shape == (3, 17, SMALL.vocab_size)
    assert model.lm_head.weight.shape == (SMALL.vocab_size, SMALL.d_model)
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T)
    # final hidden states come out of a layer norm with unit gain and zero bias at initialisation
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(3, 17), atol=1e-5, rtol=0)


def test_default_model_size():
    model = GPT(GPTConfig(), seed=0)
    # embeddings 257*128 + 128*128, two blocks of 12 d^2 + 13 d, final norm, untied head 257*128
    d = 128
    expected = 257 * d + 128 * d + 2 * (12 * d * d + 13 * d) + 2 * d + 257 * d
    assert model.num_parameters() == expected
    assert 300_000 < expected < 1_000_000


def test_causal_masking():
    model = GPT(SMALL, seed=1).eval()
    tokens = torch.randint(0, SMALL.vocab_size, (2, SMALL.context_length),
                           generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    position = 13
    changed[:, position] = (changed[:, position] + 7) % SMALL.vocab_size
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :position], after[:, :position], rtol=0, atol=0)
    assert (before[:, position:] - after[:, position:]).abs().amax(-1).min() > 1e-4


def test_initialisation_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = GPT(SMALL, seed=5), GPT(SMALL, seed=5), GPT(SMALL, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if pa.dim() >= 2:
            assert not torch.equal(pa, pc), name
    tokens = torch.randint(0, SMALL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)


def test_initial_scales():
    model = GPT(GPTConfig(n_layers=4), seed=0)
    std = model.blocks[0].attn.qkv.weight.std().item()
    residual = model.blocks[0].mlp[2].weight.std().item()
    assert abs(std - 0.02) < 0.001
    assert abs(residual - 0.02 / (2 * 4) ** 0.5) < 0.0005  # projections into the residual stream are scaled down
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_tied_head_shares_the_embedding():
    model = GPT(GPTConfig(vocab_size=40, context_length=8, d_model=16, n_heads=2, tie_weights=True), seed=0)
    assert model.lm_head.weight is model.token_embedding.weight
    untied = GPT(GPTConfig(vocab_size=40, context_length=8, d_model=16, n_heads=2), seed=0)
    assert model.num_parameters() == untied.num_parameters() - 40 * 16


def test_every_parameter_gets_a_gradient():
    model = GPT(SMALL, seed=0)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    logits = model.logits(model(tokens[:, :-1]))
    torch.nn.functional.cross_entropy(logits.reshape(-1, SMALL.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name != "position_embedding.weight":
            assert param.grad.abs().sum() > 0, name


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        GPTConfig(n_layers=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        GPTConfig(dropout=1.0)
    model = GPT(SMALL, seed=0)
    with pytest.raises(ValueError, match="above context_length 24"):
        model(torch.zeros(1, 25, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        model(torch.zeros(25, dtype=torch.int64))


def test_group_lm_loss_matches_per_group_cross_entropy():
    model = GPT(SMALL, seed=0)
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, SMALL.vocab_size, (6, 13), generator=gen)
    groups = torch.tensor([2, 0, 2, 2, 0, 0])
    loss, sums, counts = group_lm_loss(model, tokens[:, :-1], tokens[:, 1:], groups, num_groups=4)
    logits = model.logits(model(tokens[:, :-1]))
    for g in range(4):
        rows = groups == g
        if rows.any():
            expected = torch.nn.functional.cross_entropy(logits[rows].reshape(-1, SMALL.vocab_size),
                                                         tokens[rows, 1:].reshape(-1), reduction="sum")
            torch.testing.assert_close(sums[g], expected.detach())
        else:
            assert sums[g] == 0
    assert counts.tolist() == [36, 0, 36, 0]
    torch.testing.assert_close(loss.detach(), sums.sum() / 72)
    with pytest.raises(ValueError, match=r"group_ids must be in \[0, 2\)"):
        group_lm_loss(model, tokens[:, :-1], tokens[:, 1:], groups, num_groups=2)
