"""Collectives of the label-sharded step: the batch's activations gathered from every rank (and
their gradient summed back to the rank that owns each point), and each rank's top-k merged."""

from __future__ import annotations

import torch
import torch.distributed as dist

from xmlsparse.metrics import merge_topk

# torch 2.13 renamed the single-tensor collectives; older releases have only the first names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _padded_gather(x: torch.Tensor, shares: list[int]) -> torch.Tensor:
    """The rows of every rank, rank after rank: ``[sum(shares), ...]``. Shares may differ by one, so
    each rank sends ``max(shares)`` rows and the padding is dropped."""
    width = max(shares)
    padded = x if x.shape[0] == width else torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])])
    out = x.new_empty(len(shares) * width, *x.shape[1:])
    _all_gather_single(out, padded.contiguous())
    if all(share == width for share in shares):
        return out
    return torch.cat([out[rank * width : rank * width + share] for rank, share in enumerate(shares)])


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shares):  # noqa: D102 (autograd protocol)
        ctx.shares = shares
        return _padded_gather(x, shares)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102 (autograd protocol)
        shares, rank = ctx.shares, dist.get_rank()
        start = sum(shares[:rank])
        if dist.get_backend() == "nccl" and len(set(shares)) == 1:
            own = grad.new_empty(shares[rank], *grad.shape[1:])
            _reduce_scatter_single(own, grad.contiguous())
            return own, None
        # gloo has no reduce-scatter (and uneven shares none of equal size): sum everything, keep ours.
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[start : start + shares[rank]], None


def gather_rows(x: torch.Tensor, shares: list[int]) -> torch.Tensor:
    """Differentiable all-gather of each rank's ``x [shares[rank], ...]`` into ``[sum(shares), ...]``;
    the backward sums the gathered gradient over the ranks and hands each rank its own rows."""
    return _GatherRows.apply(x, shares)


def merge_topk_across_ranks(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of each row over all ranks' labels, from each rank's top-k of its own (``ids``
    global label ids; ties go to the lower id, as in one process)."""
    gathered_vals = [torch.empty_like(vals) for _ in range(dist.get_world_size())]
    gathered_ids = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_vals, vals.contiguous())
    dist.all_gather(gathered_ids, ids.contiguous())
    best_vals, best_ids = gathered_vals[0], gathered_ids[0]
    for other_vals, other_ids in zip(gathered_vals[1:], gathered_ids[1:]):
        best_vals, best_ids = merge_topk(best_vals, best_ids, other_vals, other_ids, k)
    return best_vals, best_ids


def sum_hook(process_group, bucket):  # unannotated: DDP compares the annotations with its classes, not strings
    """DistributedDataParallel communication hook (``(ProcessGroup | None, GradBucket) -> Future``)
    that sums the gradients instead of averaging them: each rank's replicated layers see only its
    own points' share of the loss, so the gradient of the global batch is the sum of the ranks'."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])
