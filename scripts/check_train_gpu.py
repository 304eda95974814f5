"""Check the training step's fused pieces on a CUDA device at Amazon-670K shapes.

* the bf16-moment Adam kernel against its torch form (weights to float32 accuracy) and both
  forms' moments against the exact float64 ones (within one bf16 step, plus the float32 rounding
  of the moment's two products);
* the head's Adam step inside its backward against a plain backward + ``CompactAdam.step`` on the
  same bf16-rounded gradient, at batches 32, 128 and 600 (each a different grad_W path): grad_h,
  and the weight update relative to its size;
* the loss written over the head's [L, B] logits against the torch loss on the same logits.

Prints a table, writes JSON to $OUT/check_train_gpu.json (or --out), exits 1 on any failure.

    PYTHONPATH=. python scripts/check_train_gpu.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.ops.adam import adam_step_reference_
from xmlsparse.ops.adam_step import AdamStep
from xmlsparse.ops.adam_kernels import adam_step_
from xmlsparse.train.compact_adam import AdamGradSink, CompactAdam
from xmlsparse.train.losses import LOSSES, loss_fn

N_LABELS = 670_091
N_INPUTS = 65_536
FAN_IN = 64


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def check_adam_kernel(n: int = 10_000_000) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, device="cuda", generator=gen)
    g = torch.randn(n, device="cuda", generator=gen) * 1e-3
    m = (torch.randn(n, device="cuda", generator=gen) * 1e-3).to(torch.bfloat16)
    v = (torch.rand(n, device="cuda", generator=gen) * 1e-6).to(torch.bfloat16)
    step = AdamStep(1e-3, 0.9, 0.999, 1e-8, 0.01, True, 7, 42)
    w2, m2, v2 = w.clone(), m.clone(), v.clone()
    exact_m = step.beta1 * m.double() + (1 - step.beta1) * g.double()
    exact_v = step.beta2 * v.double() + (1 - step.beta2) * g.double() ** 2
    # Float32 rounding of each moment's two products (large beside the result where they cancel).
    slack = [2**-22 * (step.beta1 * m.double().abs() + (1 - step.beta1) * g.double().abs()),
             2**-22 * (step.beta2 * v.double() + (1 - step.beta2) * g.double() ** 2)]
    adam_step_(w, g, m, v, step)
    adam_step_reference_(w2, g, m2, v2, step, torch.Generator(device="cuda").manual_seed(1))
    # Each moment, from kernel and torch form alike, is its float32 value rounded to one of its two
    # bf16 neighbours: within one bf16 step (2^-7 relative) of that value, itself within the slack
    # of the exact one. Reported as the largest distance over that allowance (<= 1 passes).
    moment_gap = max(float(((got.double() - exact).abs() / (2**-7 * (exact.abs() + s) + s)).max())
                     for got, exact, s in ((m, exact_m, slack[0]), (v, exact_v, slack[1]),
                                           (m2, exact_m, slack[0]), (v2, exact_v, slack[1])))
    err = relative(w, w2)
    return {"check": "adam kernel vs torch form", "shape": f"{n:,}", "weight rel err": err,
            "moment gap / allowance": moment_gap, "ok": err <= 1e-6 and moment_gap <= 1.0}


def check_head_update(batch: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch)
    fused = FixedFanInLinear(N_INPUTS, N_LABELS, FAN_IN, generator=gen, device="cuda")
    plain = copy.deepcopy(fused)
    fused_opt, plain_opt = CompactAdam(fused.parameters(), lr=1e-3), CompactAdam(plain.parameters(), lr=1e-3)
    fused.grad_weight_sink = AdamGradSink(fused_opt, fused.weight)
    start = fused.weight.detach().clone()
    h = torch.randn(batch, N_INPUTS, device="cuda", generator=gen).relu()
    grad_out = torch.randn(batch, N_LABELS, device="cuda", generator=gen).to(torch.bfloat16) * 1e-6
    grads = []
    for layer, opt in ((fused, fused_opt), (plain, plain_opt)):
        x = h.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z = layer(x)
        z.backward(grad_out)
        if layer.weight.grad is not None:
            layer.weight.grad.copy_(layer.weight.grad.to(torch.bfloat16))  # as the backward's update reads it
        opt.step()
        grads.append(x.grad)
    update_err = relative(fused.weight - start, plain.weight - start)
    grad_err = relative(grads[0], grads[1])
    return {"check": "head Adam step in backward vs plain step", "shape": f"B={batch}",
            "update rel err": update_err, "grad_h rel err": grad_err,
            "ok": update_err <= 1e-3 and grad_err <= 1e-3 and fused.weight.grad is None}


def check_consumed_loss(name: str, batch: int = 128) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(3)
    logits = (torch.randn(N_LABELS, batch, device="cuda", generator=gen) * 2).to(torch.bfloat16).t()
    counts = torch.randint(1, 10, (batch,), device="cuda", generator=gen)
    y_ptr = torch.zeros(batch + 1, dtype=torch.long, device="cuda")
    y_ptr[1:] = counts.cumsum(0)
    y_indices = torch.cat([torch.randperm(N_LABELS, device="cuda", generator=gen)[:c] for c in counts.tolist()])
    leaf = logits.float().requires_grad_()
    want = LOSSES[name](leaf, y_indices, y_ptr)
    want.backward()
    consumed = logits.clone().t().contiguous().t().requires_grad_()  # [L, B] storage, as the head writes
    value = loss_fn(name, consume_logits=True)(consumed * 1.0, y_indices, y_ptr)
    value.backward()
    loss_err = abs(value.item() - want.item()) / abs(want.item())
    grad_err = relative(consumed.grad, leaf.grad)
    return {"check": f"{name} over consumed [L, B] logits vs torch", "shape": f"B={batch}",
            "loss rel err": loss_err, "grad rel err": grad_err, "ok": loss_err <= 1e-5 and grad_err <= 1e-2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "check_train_gpu.json")
    args = parser.parse_args()
    rows = [check_adam_kernel()]
    rows += [check_head_update(batch) for batch in (32, 128, 600)]
    rows += [check_consumed_loss(name) for name in sorted(LOSSES)]
    for row in rows:
        numbers = "  ".join(f"{k} {v:.2e}" for k, v in row.items() if isinstance(v, float))
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['check']:<48} {row['shape']:<12} {numbers}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    sys.exit(0 if all(row["ok"] for row in rows) else 1)


if __name__ == "__main__":
    main()
