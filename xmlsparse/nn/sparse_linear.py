"""The fixed fan-in output layer and the sampling of its connections.

Label ``l`` reads the ``fan_in`` inputs ``indices[l]`` (int32, distinct within a row) through
``weight[l]``. Connections are drawn uniformly at random without repeats inside a row, chunked over
rows so that even 670k labels over 65k inputs never need an ``L x D`` tensor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xmlsparse.errors import XMLSparseError
from xmlsparse.ops import IMPLS
from xmlsparse.ops.fixed_fanin import ByInputCache, GradWeightSink, Plan, fixed_fanin
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN

# Elements of the largest temporary block one chunk of rows may create while sampling.
SAMPLING_CHUNK_ELEMENTS = 1 << 22


def _redraw_by_rejection(
    rows: torch.Tensor, free: torch.Tensor, n_inputs: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Fill the free slots of ``rows [R, K]`` (int64) by drawing inputs at random and redrawing
    only the slots that collide with another slot of their row, until none do.

    Cheap when few inputs of a row are taken (``8K <= D``): most draws land on a free input.
    """
    pending = free.clone()
    active = torch.arange(rows.shape[0], device=rows.device)
    while active.numel():
        sub, sub_pending = rows[active], pending[active]
        sub[sub_pending] = torch.randint(
            n_inputs, (int(sub_pending.sum()),), generator=generator, device=rows.device, dtype=rows.dtype
        )
        # Sort each row by (input, pending) so that a settled slot comes first among equal inputs:
        # every later slot with the same input is a collision and is drawn again.
        keys, order = (sub * 2 + sub_pending.long()).sort(dim=1, stable=True)
        inputs = keys // 2
        repeated_sorted = torch.zeros_like(sub_pending)
        repeated_sorted[:, 1:] = inputs[:, 1:] == inputs[:, :-1]
        sub_pending &= torch.empty_like(sub_pending).scatter_(1, order, repeated_sorted)
        rows[active], pending[active] = sub, sub_pending
        active = active[sub_pending.any(1)]
    return rows


def _redraw_by_ranking(
    rows: torch.Tensor, free: torch.Tensor, n_inputs: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Fill the free slots of ``rows [R, K]`` (int64) with the lowest-keyed inputs of a random
    ranking of the row's unused inputs. Exact in one pass; costs ``R x D``, so used when ``8K > D``.
    """
    n_rows = rows.shape[0]
    keys = torch.rand(n_rows, n_inputs + 1, generator=generator, device=rows.device)
    # Inputs held by settled slots rank last; free slots point at the spare column n_inputs.
    held = torch.where(free, torch.full_like(rows, n_inputs), rows)
    keys.scatter_(1, held, 2.0)
    n_free = int(free.sum(1).max())
    picks = keys[:, :n_inputs].topk(n_free, dim=1, largest=False).indices  # [R, n_free]
    # The j-th free slot of a row takes the row's j-th pick.
    rank = (free.long().cumsum(1) - 1).clamp_(min=0)
    return torch.where(free, picks.gather(1, rank), rows)


def redraw_distinct(
    indices: torch.Tensor, free: torch.Tensor, n_inputs: int, generator: torch.Generator | None = None,
    chunk_elements: int = SAMPLING_CHUNK_ELEMENTS,
) -> None:
    """Overwrite, in place, the slots of ``indices [L, K]`` where ``free [L, K]`` is True with
    uniformly random inputs in ``[0, n_inputs)`` that no other slot of the same row holds.

    The slots where ``free`` is False must already be distinct within their rows. A freed slot may
    draw the input it held before. Random numbers come from ``generator`` (on ``indices``' device).
    """
    n_rows, fan_in = indices.shape
    if fan_in > n_inputs:
        raise XMLSparseError(f"fan_in ({fan_in}) must not exceed the number of inputs ({n_inputs})")
    if fan_in == 0:
        return
    # Measured crossover: rejection loops longer as rows fill up, ranking costs D per row.
    by_ranking = 8 * fan_in > n_inputs
    width = n_inputs + 1 if by_ranking else fan_in
    step = max(1, chunk_elements // width)
    for start in range(0, n_rows, step):
        chunk_free = free[start : start + step]
        touched = chunk_free.any(1).nonzero().squeeze(1)
        if touched.numel() == 0:
            continue
        rows = indices[start : start + step][touched].long()
        row_free = chunk_free[touched]
        redraw = _redraw_by_ranking if by_ranking else _redraw_by_rejection
        indices[start : start + step][touched] = redraw(rows, row_free, n_inputs, generator).to(indices.dtype)


def sample_distinct_indices(
    n_rows: int,
    n_inputs: int,
    k: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    chunk_elements: int = SAMPLING_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """int32 ``[n_rows, k]``: per row, ``k`` distinct inputs drawn uniformly from ``[0, n_inputs)``.

    Sampling runs on ``generator``'s device when one is given (then moves to ``device``), else
    on ``device``; rows are drawn in chunks whose temporaries hold ``chunk_elements`` elements.
    """
    if k > n_inputs:
        raise XMLSparseError(f"fan_in ({k}) must not exceed the number of inputs ({n_inputs})")
    target = torch.device(device) if device is not None else None
    where = generator.device if generator is not None else (target or torch.device("cpu"))
    indices = torch.zeros(n_rows, k, dtype=torch.int32, device=where)
    redraw_distinct(indices, torch.ones(n_rows, k, dtype=torch.bool, device=where), n_inputs, generator,
                    chunk_elements)
    return indices if target is None else indices.to(target)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise XMLSparseError(f"{name} must be a positive integer, got {value!r}")


class FixedFanInLinear(nn.Module):
    """Sparse output layer where each of ``out_features`` labels reads ``fan_in`` of the
    ``in_features`` inputs: ``z[b, l] = sum_k weight[l, k] * h[b, indices[l, k]] + bias[l]``.

    Initialisation follows ``nn.Linear`` with the layer's true fan-in ``K``: weight and bias are
    ``U(-1/sqrt(K), 1/sqrt(K))``, so the output variance matches a dense layer reading K inputs.
    With ``group_size`` G > 1 the labels form groups of G consecutive labels that share one row of
    inputs: ``indices`` is ``[ceil(L / G), K]`` and label ``l`` reads row ``l // G`` (the last group
    may be partial); the op then runs on tensor-core kernels of its own.

    ``indices`` is a buffer (int32, saved in the state dict), not a parameter. The layer keeps the
    by-input copy of its indices that the Triton backward walks (``by_input``) and drops it
    whenever its connections change: through ``redraw_connections``, ``reset_parameters``,
    ``load_state_dict`` or a move to another device. Code that writes ``indices`` any other way
    must call ``connections_changed``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        bias: bool = True,
        impl: str = "auto",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("out_features", out_features)
        _check_positive("fan_in", fan_in)
        _check_positive("group_size", group_size)
        if fan_in > in_features:
            raise XMLSparseError(f"fan_in ({fan_in}) must not exceed in_features ({in_features})")
        if impl not in IMPLS:
            raise XMLSparseError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in = fan_in
        self.impl = impl
        self.group_size = group_size
        n_rows = -(-out_features // group_size)  # a row of inputs per group of labels
        self.register_buffer("indices", torch.empty(n_rows, fan_in, dtype=torch.int32, device=device))
        self.weight = nn.Parameter(torch.empty(out_features, fan_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # Where training steps send the weight's gradient instead of weight.grad (an optimizer's
        # sink takes its step there, range by range); None: plain gradients.
        self.grad_weight_sink: GradWeightSink | None = None
        self.by_input = ByInputCache()
        self.plan: Plan = DEFAULT_PLAN  # the op's tiles and thresholds (tests and benchmarks set others)
        self.reset_parameters(generator)

    def connections_changed(self) -> None:
        """Drop what was derived from the indices (the by-input index; rebuilt when needed)."""
        self.by_input.drop()

    @torch.no_grad()
    def redraw_connections(self, free: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Give the slots where ``free`` (shaped like ``indices``: a row per group of labels) is True
        new random inputs that their rows do not read yet (``redraw_distinct``)."""
        redraw_distinct(self.indices, free, self.in_features, generator)
        self.connections_changed()

    def train(self, mode: bool = True) -> "FixedFanInLinear":
        """As ``nn.Module.train``; entering evaluation also frees the by-input index (as large as
        the index table): evaluation runs no backward, and the next training step rebuilds it
        (milliseconds, once per evaluation)."""
        if not mode:
            self.by_input.drop()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.by_input.drop()  # an index on the old device, or of a copy, is no use
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.by_input.drop()
        super()._load_from_state_dict(*args, **kwargs)

    def init_bound(self) -> float:
        """Half-width of the uniform initialisation of weights and bias: ``1/sqrt(fan_in)``."""
        return 1.0 / math.sqrt(self.fan_in)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh connections, weights and bias (random numbers from ``generator`` if given)."""
        where = generator.device if generator is not None else self.weight.device
        self.indices.copy_(
            sample_distinct_indices(self.indices.shape[0], self.in_features, self.fan_in, generator, where)
        )
        self.connections_changed()
        bound = self.init_bound()
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                values = torch.rand(tensor.shape, generator=generator, device=where) * (2 * bound) - bound
                tensor.copy_(values)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h [..., in_features] -> z [..., out_features]``."""
        if h.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(h.shape)}")
        z = self.logits(h.reshape(-1, self.in_features), 0, self.out_features)
        # 2-D inputs get the op's own output, not a reshaped view of it: the loss may write over it.
        return z if h.dim() == 2 else z.reshape(*h.shape[:-1], self.out_features)

    def logits(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``z [B, stop - start]``: the logits of labels ``[start, stop)`` for ``h [B, in_features]``,
        the one place a label's logit is computed (training takes all labels at once, evaluation
        blocks of them). Only whole-layer calls keep the by-input index and feed the gradient sink.
        With groups, ``start`` must begin a group."""
        group = self.group_size
        if group > 1:
            if start % group:
                raise ValueError(f"label blocks of a grouped layer start at a group: {start} is no multiple of {group}")
            if start == 0 and stop == self.out_features:
                sink = self.grad_weight_sink if self.training and torch.is_grad_enabled() else None
                return fixed_fanin(h, self.indices, self.weight, self.bias, impl=self.impl, sink=sink, plan=self.plan,
                                   group_size=group)
            rows, weight = self.indices[start // group : -(-stop // group)], self.weight[start:stop]
            bias = None if self.bias is None else self.bias[start:stop]
            return fixed_fanin(h, rows, weight, bias, impl=self.impl, plan=self.plan, group_size=group)
        if start == 0 and stop == self.out_features:
            # The tensors themselves, not views: a training step then adds no slice nodes to the graph.
            sink = self.grad_weight_sink if self.training and torch.is_grad_enabled() else None
            return fixed_fanin(h, self.indices, self.weight, self.bias, impl=self.impl, sink=sink,
                               by_input=self.by_input, plan=self.plan)
        bias = None if self.bias is None else self.bias[start:stop]
        return fixed_fanin(h, self.indices[start:stop], self.weight[start:stop], bias, impl=self.impl, plan=self.plan)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"bias={self.bias is not None}, impl={self.impl}"
            + (f", group_size={self.group_size}" if self.group_size > 1 else "")
        )
