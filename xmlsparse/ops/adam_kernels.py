"""Triton kernels of ``xmlsparse.ops.adam``: Adam with bf16 moments stored by stochastic rounding.

``adam_step_`` launches the elementwise update of one tensor: one coalesced pass that reads the
weight, its gradient and both moments and writes the weight and both moments. ``grad_weight_adam_``
fuses the step into the fixed fan-in layer's grad_W pass, built from that op's shared kernel
helpers: the optimizer's sink offers it to the op's backward (``FusedGradWeightSink``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xmlsparse.ops.adam_step import AdamStep, check_state
from xmlsparse.ops.fixed_fanin.kernels import grad_out_tile, grad_weight_part
from xmlsparse.ops.fixed_fanin.plan import Blocks

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


@triton.jit
def _grad_weight_adam_kernel(
    ht_ptr, ldh, g_ptr, stride_gb, stride_gl, idx_ptr, gb_ptr, B, L, K,
    w_ptr, m_ptr, v_ptr, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, seed,
    HAS_BIAS: tl.constexpr, DECOUPLED: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    # The fixed fan-in grad_W pass over one batch block (B <= BLOCK_B), each [labels, slots] tile
    # taking its Adam step where it is computed: from the gradient rounded to bf16, as a range
    # handed to the sink would be, with the same rounding bits (Philox counter = slot). No
    # gradient is stored at all.
    pid_l = tl.program_id(0)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    mask_l = offs_l < L
    row = offs_l.to(tl.int64) * K
    offs_b = tl.arange(0, BLOCK_B)
    g = grad_out_tile(g_ptr, stride_gb, stride_gl, offs_l, offs_b, mask_l, offs_b < B)
    if HAS_BIAS:
        tl.store(gb_ptr + offs_l, tl.sum(g, axis=1).to(gb_ptr.dtype.element_ty), mask=mask_l)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_lk = mask_l[:, None] & (offs_k < K)[None, :]
        slot = row[:, None] + offs_k[None, :]
        part = grad_weight_part(ht_ptr, ldh, idx_ptr, g, slot, mask_lk, offs_b, offs_b < ldh)
        grad = part.to(tl.bfloat16).to(tl.float32)
        adam_update(w_ptr, m_ptr, v_ptr, slot, mask_lk, grad, lr, beta1, beta2, eps, weight_decay,
                    step_size, bc2_sqrt, seed, slot, DECOUPLED)


def grad_weight_adam_(grad_out: torch.Tensor, h_t: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad_bias: torch.Tensor | None,
                      step: AdamStep, blocks: Blocks) -> None:
    """The fixed fan-in layer's grad_W from ``grad_out [B, L]`` and ``h^T [D, ldh]``, applied as
    one Adam step to ``weight`` (``[L, K]``, with its bf16 moments) tile by tile, in one pass;
    ``grad_bias`` gets the batch sums of ``grad_out``. The batch must fit one block of ``blocks``."""
    batch, n_labels = grad_out.shape
    fan_in = indices.shape[1]
    if not 0 < batch <= blocks.block_b:
        raise ValueError(f"the fused grad_W step needs 1 to {blocks.block_b} batch rows, got {batch}")
    _grad_weight_adam_kernel[(triton.cdiv(n_labels, blocks.block_l),)](
        h_t, h_t.shape[1], grad_out, grad_out.stride(0), grad_out.stride(1), indices,
        grad_bias if grad_bias is not None else weight, batch, n_labels, fan_in,
        weight, exp_avg, exp_avg_sq, step.lr, step.beta1, step.beta2, step.eps, step.weight_decay,
        step.step_size, step.bias_correction2_sqrt, step.seed,
        HAS_BIAS=grad_bias is not None, DECOUPLED=step.decoupled,
        BLOCK_L=blocks.block_l, BLOCK_K=blocks.block_k, BLOCK_B=blocks.block_b, num_warps=blocks.num_warps,
    )
