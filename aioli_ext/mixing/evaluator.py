"""Per-group validation loss on a fixed set of sequences, for the mixers' evaluations.

The same sequences are scored every time, so the differences between two evaluations (what LearnParams
measures) carry no sampling noise from the validation set. Loss statistics come from the group loss kernels
(``aioli_ext.group_cross_entropy`` on logits, or ``aioli_ext.group_linear_cross_entropy`` on final hidden
states and the LM head, which never materialises the logits); they accumulate in fp32 inside a batch and in
float64 across batches, and are all-reduced once per evaluation when torch.distributed is initialised.
"""
import torch

from ..distributed import all_reduce_sum, is_initialized
from .checks import FLOAT, check_int


def _default_loss_fn():
    import aioli_ext
    return aioli_ext.group_cross_entropy


def _default_linear_loss_fn():
    import aioli_ext
    return aioli_ext.group_linear_cross_entropy


class GroupEvaluator:
    """Scores a model on a fixed per-group validation set and returns per-group mean token losses.

    Args:
        input_ids: int64 [N, T], the model inputs of N sequences.
        targets: int64 [N, T], next-token targets; ``ignore_index`` marks positions that do not count.
        group_ids: int [N], the group of each sequence, in [0, num_groups).
        num_groups: K; every group must have at least one counted token (on the whole set).
        batch_size: sequences per forward call.
        ignore_index: target value that is not counted.
        device: where batches are moved before the forward call; None keeps the tensors' own device.
        loss_fn: replaces ``aioli_ext.group_cross_entropy`` (same signature and outputs).
        linear_loss_fn: replaces ``aioli_ext.group_linear_cross_entropy`` (same signature and outputs).
        chunk_size: passed to the linear loss (vocabulary chunk), None lets it choose.
        shard: when torch.distributed is initialised, rank r scores sequences r, r + W, r + 2W, ... and the
            statistics are summed over ranks; False scores every sequence on every rank (then the sums are
            divided back by W: the result is the same, the work is not split).

    Calling the evaluator with ``forward`` (a callable taking int64 [B, T] inputs) returns float64 [K] on the
    CPU: per-group mean token loss. ``forward`` returns either logits [B, T, V] (or [B·T, V], or an object with
    a ``.logits`` attribute), or a tuple ``(hidden [B, T, D] or [B·T, D], head)`` where head is the LM head
    weight [V, D] or an ``nn.Linear`` (its bias is used). If ``forward`` is an ``nn.Module`` it is put in eval
    mode for the call and restored afterwards. Gradients are off.

    After a call, ``last_token_counts`` (int64 [K]) and ``last_loss_sums`` (float64 [K]) hold the statistics of
    the call (summed over ranks).
    """

    def __init__(self, input_ids, targets, group_ids, num_groups, *, batch_size=16, ignore_index=-100,
                 device=None, loss_fn=None, linear_loss_fn=None, chunk_size=None, shard=True):
        self.num_groups = check_int(num_groups, "num_groups", minimum=1)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.ignore_index = check_int(ignore_index, "ignore_index")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be an int64 tensor [N, T], got {getattr(input_ids, 'shape', input_ids)}")
        if input_ids.dtype != torch.int64:
            raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
        if not isinstance(targets, torch.Tensor) or targets.shape != input_ids.shape:
            raise ValueError(f"targets must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(targets, 'shape', ()))}")
        if targets.dtype != torch.int64:
            raise TypeError(f"targets must be int64, got {targets.dtype}")
        if not isinstance(group_ids, torch.Tensor) or group_ids.shape != (input_ids.shape[0],):
            raise ValueError(f"group_ids must be a tensor [N] = [{input_ids.shape[0]}] (one group per sequence), "
                             f"got {tuple(getattr(group_ids, 'shape', ()))}")
        if group_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"group_ids must be int32 or int64, got {group_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("the validation set must hold at least one sequence")
        if bool((group_ids < 0).any()) or bool((group_ids >= self.num_groups).any()):
            raise ValueError(f"group_ids must be in [0, num_groups) = [0, {self.num_groups}), got values "
                             f"{sorted(set(group_ids.tolist()))}")
        counted = (targets != self.ignore_index).sum(dim=1).to("cpu")
        per_group = torch.zeros(self.num_groups, dtype=torch.int64).index_add_(0, group_ids.to("cpu", torch.int64),
                                                                               counted)
        empty = torch.nonzero(per_group == 0).flatten().tolist()
        if empty:
            raise ValueError(f"groups {empty} have no counted validation tokens: every group needs at least one "
                             f"target != ignore_index")
        self.input_ids = input_ids
        self.targets = targets
        self.group_ids = group_ids.to(torch.int64)
        self.device = None if device is None else torch.device(device)
        self.chunk_size = chunk_size
        self.shard = bool(shard)
        self._loss_fn = loss_fn
        self._linear_loss_fn = linear_loss_fn
        self.tokens_per_group = per_group
        self.last_token_counts = None
        self.last_loss_sums = None

    @classmethod
    def from_group_sequences(cls, sequences, **kwargs):
        """Build from one int64 [N_g, T + 1] token tensor per group (inputs = tokens[:, :-1], targets =
        tokens[:, 1:]); ``kwargs`` go to the constructor."""
        sequences = list(sequences)
        if not sequences:
            raise ValueError("sequences must hold one tensor per group")
        for index, tokens in enumerate(sequences):
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] < 2:
                raise ValueError(f"sequences[{index}] must be a tensor [N_g, T + 1] with T >= 1, got "
                                 f"{tuple(getattr(tokens, 'shape', ()))}")
        tokens = torch.cat(sequences).to(torch.int64)
        group_ids = torch.repeat_interleave(torch.arange(len(sequences)),
                                            torch.tensor([t.shape[0] for t in sequences]))
        kwargs.setdefault("num_groups", len(sequences))
        return cls(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), group_ids, **kwargs)

    def _rank_rows(self):
        rows = torch.arange(self.input_ids.shape[0])
        if self.shard and is_initialized():
            rows = rows[torch.distributed.get_rank()::torch.distributed.get_world_size()]
        return rows

    def _batch_statistics(self, output, targets, group_ids):
        """(group_sums, token_counts) of one batch from the forward output."""
        batch, length = targets.shape
        if hasattr(output, "logits") and not isinstance(output, torch.Tensor):
            output = output.logits
        if isinstance(output, torch.Tensor):
            loss_fn = self._loss_fn or _default_loss_fn()
            if output.dim() == 3 and output.shape[:2] == (batch, length):
                _, sums, counts = loss_fn(output, targets, group_ids, self.num_groups, ignore_index=self.ignore_index)
            elif output.dim() == 2 and output.shape[0] == batch * length:
                _, sums, counts = loss_fn(output, targets.reshape(-1), group_ids.repeat_interleave(length),
                                          self.num_groups, ignore_index=self.ignore_index)
            else:
                raise ValueError(f"forward returned logits of shape {tuple(output.shape)}; expected [{batch}, "
                                 f"{length}, V] or [{batch * length}, V]")
            return sums, counts
        if isinstance(output, (tuple, list)) and len(output) == 2:
            hidden, head = output
            if isinstance(head, torch.nn.Linear):
                weight, bias = head.weight, head.bias
            elif isinstance(head, torch.Tensor):
                weight, bias = head, None
            else:
                raise TypeError(f"the LM head must be a weight tensor [V, D] or an nn.Linear, got "
                                f"{type(head).__name__}")
            shaped = isinstance(hidden, torch.Tensor) and (
                (hidden.dim() == 3 and hidden.shape[:2] == (batch, length))
                or (hidden.dim() == 2 and hidden.shape[0] == batch * length))
            if not shaped:
                raise ValueError(f"forward returned hidden states of shape {tuple(getattr(hidden, 'shape', ()))}; "
                                 f"expected [{batch}, {length}, D] or [{batch * length}, D]")
            linear_loss_fn = self._linear_loss_fn or _default_linear_loss_fn()
            _, sums, counts = linear_loss_fn(hidden.reshape(batch * length, -1), weight, targets.reshape(-1),
                                             group_ids.repeat_interleave(length), self.num_groups, bias=bias,
                                             ignore_index=self.ignore_index, chunk_size=self.chunk_size)
            return sums, counts
        raise TypeError(f"forward must return logits (a tensor) or a tuple (hidden, head), got {type(output).__name__}")

    def __call__(self, forward):
        """Per-group mean token loss of ``forward`` on the validation set: float64 [K] on the CPU."""
        module = forward if isinstance(forward, torch.nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        rows = self._rank_rows()
        sums = None
        counts = None
        try:
            with torch.no_grad():
                for begin in range(0, rows.numel(), self.batch_size):
                    index = rows[begin:begin + self.batch_size].to(self.input_ids.device)
                    inputs = self.input_ids.index_select(0, index)
                    targets = self.targets.index_select(0, index.to(self.targets.device))
                    group_ids = self.group_ids.index_select(0, index.to(self.group_ids.device))
                    if self.device is not None:
                        inputs, targets, group_ids = (t.to(self.device, non_blocking=True)
                                                      for t in (inputs, targets, group_ids))
                    else:
                        targets = targets.to(inputs.device)
                        group_ids = group_ids.to(inputs.device)
                    batch_sums, batch_counts = self._batch_statistics(forward(inputs), targets, group_ids)
                    # Per-batch sums are fp32 from the kernel; across batches they add up in float64.
                    batch_sums = batch_sums.to(FLOAT)
                    batch_counts = batch_counts.to(torch.int64)
                    sums = batch_sums if sums is None else sums + batch_sums.to(sums.device)
                    counts = batch_counts if counts is None else counts + batch_counts.to(counts.device)
        finally:
            if module is not None:
                module.train(was_training)
        sums, counts = self._reduce(sums, counts)
        self.last_loss_sums, self.last_token_counts = sums, counts
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise RuntimeError(f"groups {empty} got no counted tokens from the loss function")
        return sums / counts.to(FLOAT)

    def _reduce(self, sums, counts):
        """Sum the statistics over ranks with one all-reduce of a float64 [2K] tensor (counts < 2^53 are exact)."""
        if not is_initialized():
            return sums.to("cpu"), counts.to("cpu")
        # A rank whose shard is empty (fewer sequences than ranks) still joins the collective, with zeros.
        packed = torch.zeros(2 * self.num_groups, dtype=FLOAT)
        if sums is not None:
            packed[:self.num_groups] = sums.to("cpu")
            packed[self.num_groups:] = counts.to("cpu", FLOAT)
        packed = all_reduce_sum(packed)
        if not self.shard:
            packed /= torch.distributed.get_world_size()
        return packed[:self.num_groups].clone(), packed[self.num_groups:].round().to(torch.int64)
