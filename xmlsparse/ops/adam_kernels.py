"""Triton kernels of ``xmlsparse.ops.adam``: Adam with bf16 moments stored by stochastic rounding.

``adam_step_`` launches the elementwise update of one tensor: one coalesced pass that reads the
weight, its gradient and both moments and writes the weight and both moments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xmlsparse.ops.adam_step import AdamStep, check_state

BLOCK = 1024


@triton.jit
def round_to_bf16(x, bits16):
    """fp32 ``x`` -> bf16, rounded up in magnitude with probability (distance to the lower bf16
    neighbour) / (bf16 step); ``bits16`` are uniform random integers in [0, 2^16)."""
    raw = x.to(tl.uint32, bitcast=True)
    raw = (raw + bits16.to(tl.uint32)) & 0xFFFF0000
    return raw.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def adam_math(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, DECOUPLED: tl.constexpr):
    """One Adam/AdamW step in float32 on register tiles: returns the new ``(w, m, v)``."""
    if DECOUPLED:
        w = w * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    return w, m, v


@triton.jit
def store_adam_state(w_ptr, m_ptr, v_ptr, offs, mask, w, m, v, seed, counter):
    """Store new weights (rounded stochastically when bf16) and bf16 moments at ``offs``; the
    random bits come from Philox keyed by (``seed``, ``counter``: the element's place in the
    whole parameter)."""
    r0, r1, r2, _ = tl.randint4x(seed, counter)
    tl.store(m_ptr + offs, round_to_bf16(m, r0 & 0xFFFF), mask=mask)
    tl.store(v_ptr + offs, round_to_bf16(v, r1 & 0xFFFF), mask=mask)
    if w_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(w_ptr + offs, round_to_bf16(w, r2 & 0xFFFF), mask=mask)
    else:
        tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adam_update(w_ptr, m_ptr, v_ptr, offs, mask, g, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, seed,
                counter, DECOUPLED: tl.constexpr):
    """One Adam step of the elements at ``offs`` with their float32 gradient tile ``g``: load the
    weight and moments, update them, store them (``store_adam_state``, bits keyed by ``counter``)."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w, m, v = adam_math(w, g, m, v, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, DECOUPLED)
    store_adam_state(w_ptr, m_ptr, v_ptr, offs, mask, w, m, v, seed, counter)


@triton.jit
def _adam_kernel(w_ptr, g_ptr, m_ptr, v_ptr, n, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, seed,
                 offset, DECOUPLED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adam_update(w_ptr, m_ptr, v_ptr, offs, mask, g, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, seed,
                offs + offset, DECOUPLED)


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: AdamStep, offset: int = 0) -> None:
    """Update ``param``, ``exp_avg``, ``exp_avg_sq`` in place with the Triton kernel (one pass).
    ``offset``: where ``param`` starts in the whole parameter when it is a slice of one (the
    rounding bits are a function of the element's place in the whole)."""
    check_state(param, grad, exp_avg, exp_avg_sq)
    n = param.numel()
    if n == 0:
        return
    _adam_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, n, step.lr, step.beta1, step.beta2, step.eps, step.weight_decay,
        step.step_size, step.bias_correction2_sqrt, step.seed, offset, DECOUPLED=step.decoupled, BLOCK=BLOCK,
        num_warps=4,
    )
