"""A small GPT for data-mixing experiments: pre-LN, causal self-attention, learned positions.

``GPT.forward`` returns the final hidden states [B, T, D] (after the last layer norm), not logits, so the
training loss can be fused with the LM head: ``group_linear_cross_entropy(hidden, model.lm_head.weight,
targets, group_ids, K)`` never builds the [B, T, V] logits. ``model.logits(hidden)`` gives them when needed.
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 257
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    tie_weights: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={self.d_model}, "
                             f"n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self):
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        shape = (batch, length, self.n_heads, width // self.n_heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer. ``GPT(config, seed)`` initialises deterministically from ``seed`` with its own
    generator (the global torch RNG is neither read nor advanced), so every method in a comparison can start
    from the very same weights."""

    def __init__(self, config: GPTConfig = None, seed: int = 0):
        super().__init__()
        self.config = config = config or GPTConfig()
        # torch's layer constructors draw a throw-away initialisation from the global RNG; fork it so that
        # building a model does not change the data order or dropout masks of the run that builds it.
        with torch.random.fork_rng(devices=[]):
            self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
            self.position_embedding = nn.Embedding(config.context_length, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0):
        """GPT-2 style: N(0, 0.02) weights, zero biases, unit layer norms; the projections that write into the
        residual stream get std 0.02 / sqrt(2 * n_layers) so its variance does not grow with depth."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                param.copy_(values)

    def num_parameters(self, include_embeddings=True) -> int:
        count = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            count -= self.position_embedding.weight.numel()
        return count

    def forward(self, tokens):
        """tokens int64 [B, T] (T <= context_length) -> final hidden states [B, T, d_model]."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"tokens has length {length}, above context_length {self.config.context_length}")
        positions = torch.arange(length, device=tokens.device)
        x = self.drop(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def logits(self, hidden):
        """hidden [..., d_model] -> logits [..., vocab_size] through the LM head."""
        return self.lm_head(hidden)


def group_lm_loss(model, inputs, targets, group_ids, num_groups):
    """Plain-torch language-model loss with per-group statistics.

    inputs, targets int64 [B, T]; group_ids int64 [B] (one group per sequence) or [B, T]; returns
    (mean loss over all tokens: a differentiable scalar, per-group loss sums fp32 [K], token counts int64 [K]).
    The fused kernel path computes the same numbers from ``model(inputs)`` and ``model.lm_head.weight``
    without building the logits.
    """
    hidden = model(inputs)
    logits = model.logits(hidden).float()
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    groups = group_ids if group_ids.dim() == 2 else group_ids[:, None].expand_as(targets)
    groups = groups.reshape(-1)
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= num_groups):
        raise ValueError(f"group_ids must be in [0, {num_groups}), got values in [{int(groups.min())}, "
                         f"{int(groups.max())}]")
    sums = torch.zeros(num_groups, dtype=torch.float32, device=per_token.device)
    sums.index_add_(0, groups, per_token.detach())
    counts = torch.bincount(groups, minlength=num_groups)
    return per_token.mean(), sums, counts
