"""Public ops of the fixed fan-in layer.

`fixed_fanin(h, indices, weight, bias)` computes ``z[b, l] = sum_k W[l, k] * h[b, I[l, k]] + bias[l]``.
Two implementations share one signature: Triton kernels (``xmlsparse.ops.fixed_fanin``), used on
CUDA, and plain chunked torch (``xmlsparse.ops.reference``), which runs everywhere and is the oracle.
"""

from __future__ import annotations

import importlib.util

import torch

from xmlsparse.ops.adam import WeightUpdate

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """True when the Triton package can be imported (it ships for Linux only)."""
    return importlib.util.find_spec("triton") is not None


if triton_available():
    # Imported before the dispatcher below is defined: importing a submodule binds its name on the
    # package, and the package attribute ``fixed_fanin`` must stay the function, not the module.
    import xmlsparse.ops.fixed_fanin  # noqa: F401


def release_backward_index(indices: torch.Tensor) -> None:
    """Free the by-input copy of ``indices`` that the Triton backward keeps between steps (rebuilt
    by the next backward that needs it)."""
    if triton_available():
        from xmlsparse.ops.fixed_fanin import drop_transposed_index

        drop_transposed_index(indices)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``auto`` to the implementation used on ``device``; validate explicit choices."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    return impl


def fixed_fanin(
    h: torch.Tensor,
    indices: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    weight_update: WeightUpdate | None = None,
) -> torch.Tensor:
    """Differentiable fixed fan-in layer: ``h [B, D]``, ``indices`` int32 ``[L, K]``,
    ``weight [L, K]``, ``bias [L]`` or None -> ``z [B, L]``. With ``weight_update`` (an optimizer's
    handle on ``weight``, ``xmlsparse.ops.adam.WeightUpdate``) the backward applies the weight's
    optimizer step itself and leaves ``weight.grad`` unset."""
    chosen = resolve_impl(impl, h.device)
    if chosen == "triton":
        from xmlsparse.ops.fixed_fanin import fixed_fanin as triton_fixed_fanin

        return triton_fixed_fanin(h, indices, weight, bias, weight_update=weight_update)
    from xmlsparse.ops.reference import fixed_fanin as reference_fixed_fanin

    return reference_fixed_fanin(h, indices, weight, bias, weight_update=weight_update)
