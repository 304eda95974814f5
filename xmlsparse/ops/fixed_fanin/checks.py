"""Argument checks of the Triton fixed fan-in launchers (the kernels check nothing: a check on the
device would cost a host sync every step)."""

from __future__ import annotations

import os

import torch

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must share one device, got {sorted(map(str, devices))}")
    device = tensors[0].device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton fixed fan-in kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def check_indices(indices: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    if indices.dim() != 2 or indices.dtype != torch.int32:
        raise ValueError(f"indices must be an int32 [L, K] tensor, got {indices.dtype} {tuple(indices.shape)}")
    if weight is not None:
        if weight.shape != indices.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} differs from indices shape {tuple(indices.shape)}")
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"weight must be float32 or bfloat16, got {weight.dtype}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_INPUTS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def new_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """``out`` when it is a contiguous tensor of this shape, dtype and device, a new one when None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {shape} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


def check_group_shapes(indices: torch.Tensor, weight: torch.Tensor, group_size: int) -> None:
    """``weight [L, K]`` with ``indices [ceil(L / group_size), K]``: a row of inputs per group."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n_labels, fan_in = weight.shape if weight.dim() == 2 else (-1, -1)
    want = (-(-n_labels // group_size), fan_in)
    if weight.dim() != 2 or tuple(indices.shape) != want:
        what = "differs from indices shape" if group_size == 1 else f"needs indices of shape {want} (group_size {group_size}), got"
        raise ValueError(f"weight shape {tuple(weight.shape)} {what} {tuple(indices.shape)}")


def check_call(h: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               sink: object | None) -> None:
    """What the Triton ops check besides the index table's shape: ``bias [L]``, one device, and a
    contiguous weight where a gradient sink may write it."""
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    check_device(h, indices, weight, *([bias] if bias is not None else []))
    if sink is not None and not weight.is_contiguous():
        raise ValueError("a weight whose gradient goes to a sink must be contiguous (the sink may write it)")


def logits_input(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """``h`` as the op reads it and the logits' dtype: under autocast h is cast to the autocast
    dtype and the logits come out in it, as ``torch.nn.functional.linear`` does (W is read in its
    own dtype); otherwise the logits take ``promote_types(h.dtype, W.dtype)``."""
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
        return h, h.dtype
    return h, torch.promote_types(h.dtype, weight.dtype)
