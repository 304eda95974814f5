"""Adam with bfloat16 moments, stored by stochastic rounding: the update's scalars and its torch form.

The two moments take half the bytes of torch's fp32 Adam state. Rounding them to nearest would stall
them: ``v = 0.999 v + 0.001 g^2`` moves ``v`` by less than half a bf16 step (2^-9 relative) whenever
``g^2`` is near ``v``, so the update would round back to the old value every time. Stochastic rounding
keeps every update in expectation: the fp32 result is rounded up with probability equal to its
distance from the lower bf16 neighbour, by adding 16 random bits to the low half of its bit pattern
and truncating. Weights keep their own dtype (fp32 master weights by default; bf16 weights are
rounded the same way). The arithmetic, in float32, is torch's Adam/AdamW:

    g += wd * w                      (Adam)       w *= 1 - lr * wd   (AdamW)
    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The step's scalars and the checks of its tensors are in ``xmlsparse.ops.adam_step``, the Triton kernel in
``xmlsparse.ops.adam_kernels``; ``adam_step_reference_`` here is the same update in torch (the CPU path and the kernels' oracle),
drawing its random bits from a torch generator instead of Philox. ``apply_adam_`` picks one.
"""

from __future__ import annotations

import torch

from xmlsparse.ops.adam_step import AdamStep, check_state

# Elements per chunk of the torch update (its float32 temporaries).
REFERENCE_CHUNK = 1 << 22


def round_to_bf16_reference(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic rounding of float32 ``x`` to bfloat16 in torch (the kernels' rule)."""
    bits = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    # Two's-complement addition on the int32 view is the unsigned addition the kernel does.
    raw = (x.contiguous().view(torch.int32) + bits) & -65536
    return raw.view(torch.float32).to(torch.bfloat16)


@torch.no_grad()
def adam_step_reference_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         step: AdamStep, generator: torch.Generator | None = None) -> None:
    """The same update as ``adam_step_`` in torch, in place, over chunks of ``REFERENCE_CHUNK``
    elements (the fp32 temporaries stay small); random bits from ``generator``."""
    check_state(param, grad, exp_avg, exp_avg_sq)
    flat = [t.view(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    for start in range(0, param.numel(), REFERENCE_CHUNK):
        p, g, m_out, v_out = (t[start : start + REFERENCE_CHUNK] for t in flat)
        w, g = p.float(), g.float()
        if step.decoupled:
            w = w * (1.0 - step.lr * step.weight_decay)
        else:
            g = g + step.weight_decay * w
        m = m_out.float().mul_(step.beta1).add_(g, alpha=1.0 - step.beta1)
        v = v_out.float().mul_(step.beta2).addcmul_(g, g, value=1.0 - step.beta2)
        w = w - step.step_size * m / (v.sqrt() / step.bias_correction2_sqrt + step.eps)
        m_out.copy_(round_to_bf16_reference(m, generator))
        v_out.copy_(round_to_bf16_reference(v, generator))
        p.copy_(round_to_bf16_reference(w, generator) if p.dtype == torch.bfloat16 else w)


def apply_adam_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: AdamStep, offset: int = 0) -> None:
    """``adam_step_`` on CUDA, ``adam_step_reference_`` elsewhere (random bits seeded by
    ``step.seed`` and ``offset``, where ``param`` starts when it is a slice of a parameter)."""
    if param.is_cuda:
        from xmlsparse.ops.adam_kernels import adam_step_

        adam_step_(param, grad, exp_avg, exp_avg_sq, step, offset)
        return
    generator = torch.Generator(device=param.device)
    generator.manual_seed(step.seed * 1_000_003 + offset)
    adam_step_reference_(param, grad, exp_avg, exp_avg_sq, step, generator)
