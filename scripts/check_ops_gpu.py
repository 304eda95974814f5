"""Check the Triton fixed fan-in kernels on a CUDA device at Amazon-670K shapes.

Every output buffer starts as NaN; each output is compared, on a sample of labels (rows of z and
grad_W) or inputs (columns of grad_h), with a float64 computation from the same (rounded) inputs:
relative error ||got - ref|| / ||ref|| <= 1e-5 with float32 inputs, <= 1e-2 with bf16 activations.
Prints a table, writes JSON to $OUT/check_ops_gpu.json (or --out), exits 1 on any failure.

    PYTHONPATH=. python scripts/check_ops_gpu.py [--quick] [--only plain|grouped]

The grouped op is checked at G = 16, 32, 64, K = 32, 64, 128 and B = 32, 128, 512 (--quick: G = 16,
32, K = 64, B = 7, 128).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from xmlsparse.ops.fixed_fanin import triton_op as ff
from xmlsparse.ops.fixed_fanin.plan import Plan

N_LABELS = 670_091
N_INPUTS = 65_536
BOUNDS = {"fp32": 1e-5, "bf16": 1e-2}


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30))

    return make


class PoisonedAllocations:
    """Within the block every torch.empty / empty_like starts as NaN (integers as -2**30)."""

    def __enter__(self):
        self.saved = torch.empty, torch.empty_like
        torch.empty, torch.empty_like = _poisoned(torch.empty), _poisoned(torch.empty_like)

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self.saved


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-300))


class Oracle:
    """float64 values of z, grad_W (sampled labels), grad_h (sampled inputs) and grad_bias."""

    def __init__(self, h, indices, weight, bias, grad_out, gen):
        n_labels, fan_in = indices.shape
        n_inputs = h.shape[1]
        dev = h.device
        self.labels = torch.randperm(n_labels, generator=gen, device="cpu")[:1024].to(dev)
        self.inputs = torch.randperm(n_inputs, generator=gen, device="cpu")[:128].to(dev)
        h64, w64 = h.double(), weight.double()
        rows = indices[self.labels].long()  # [S, K]
        gathered = h64[:, rows.reshape(-1)].view(h.shape[0], len(self.labels), fan_in)  # [B, S, K]
        self.z = (gathered * w64[self.labels]).sum(2) + bias.double()[self.labels]
        self.grad_w = (gathered * grad_out[:, self.labels, None].double()).sum(0)
        self.grad_b = grad_out.sum(0, dtype=torch.float64)
        position = torch.full((n_inputs,), -1, dtype=torch.long, device=dev)
        position[self.inputs] = torch.arange(len(self.inputs), device=dev)
        lab, slot = torch.isin(indices, self.inputs.to(indices.dtype)).nonzero(as_tuple=True)
        target = position[indices[lab, slot].long()]
        self.grad_h = torch.zeros(h.shape[0], len(self.inputs), dtype=torch.float64, device=dev)
        self.grad_h.index_add_(1, target, grad_out[:, lab].double() * w64[lab, slot])

    def errors(self, z=None, grad_h=None, grad_w=None, grad_b=None) -> dict[str, float]:
        out = {}
        for name, got, ref, pick in (
            ("z", z, self.z, lambda t: t[:, self.labels]),
            ("grad_h", grad_h, self.grad_h, lambda t: t[:, self.inputs]),
            ("grad_W", grad_w, self.grad_w, lambda t: t[self.labels]),
            ("grad_bias", grad_b, self.grad_b, lambda t: t),
        ):
            if got is not None:
                out[name] = _rel(pick(got), ref) if bool(torch.isfinite(got).all()) else float("nan")
        return out


def problem(n_rows: int, fan_in: int, batch: int, kind: str, n_inputs: int, n_labels: int, dev: torch.device,
            seed: int):
    """``(generator, activation dtype, indices [n_rows, K], weight, bias, h, grad_out)`` of one case,
    seeded, with repeated inputs in every fifth row of the indices."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    act = torch.float32 if kind == "fp32" else torch.bfloat16
    indices = torch.randint(0, n_inputs, (n_rows, fan_in), device=dev, dtype=torch.int32)
    indices[::5, 1] = indices[::5, 0]  # repeats within rows
    weight = torch.randn(n_labels, fan_in, device=dev) / fan_in**0.5
    bias = torch.randn(n_labels, device=dev) * 0.1
    h = torch.randn(batch, n_inputs, device=dev).relu().to(act)
    grad_out = torch.randn(batch, n_labels, device=dev).to(act)
    return gen, act, indices, weight, bias, h, grad_out


def check_case(fan_in: int, batch: int, kind: str, n_inputs: int, n_labels: int, dev: torch.device,
               seed: int) -> list[dict]:
    gen, act, indices, weight, bias, h, grad_out = problem(n_labels, fan_in, batch, kind, n_inputs, n_labels, dev, seed)
    oracle = Oracle(h, indices, weight, bias, grad_out, gen)
    rows = []

    def record(path: str, errs: dict[str, float]) -> None:
        for name, err in errs.items():
            ok = not math.isnan(err) and err <= BOUNDS[kind]
            rows.append(dict(K=fan_in, B=batch, D=n_inputs, dtype=kind, path=path, output=name, rel_err=err,
                             bound=BOUNDS[kind], ok=ok))

    nan = lambda shape, dtype: torch.full(shape, float("nan"), dtype=dtype, device=dev)  # noqa: E731
    z = ff.forward(h, indices, weight, bias, out=nan((batch, n_labels), act), out_dtype=act)
    record("forward", oracle.errors(z=z))
    del z
    gw = ff.grad_weight(grad_out, h, indices, out=nan((n_labels, fan_in), torch.float32), out_dtype=torch.float32)
    record("grad_weight", oracle.errors(grad_w=gw))
    del gw
    gh = ff.grad_input(grad_out, indices, weight, n_inputs, out=nan((batch, n_inputs), act), out_dtype=act)
    record("grad_input", oracle.errors(grad_h=gh))
    del gh
    # grad_W in its own pass, and from the by-input grad_h pass (fused_min_batch 1).
    for path, plan in (("autograd", Plan()), ("autograd/fused-grad-w", Plan(fused_min_batch=1))):
        leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
        with PoisonedAllocations(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=kind == "bf16"):
            z = ff.fixed_fanin(leaves[0], indices, leaves[1], leaves[2], plan=plan)
            z.backward(grad_out.to(z.dtype))
        record(path, oracle.errors(z=z, grad_h=leaves[0].grad, grad_w=leaves[1].grad, grad_b=leaves[2].grad))
        del z, leaves
    return rows


def check_grouped_case(group: int, fan_in: int, batch: int, kind: str, n_inputs: int, n_labels: int,
                       dev: torch.device, seed: int) -> list[dict]:
    """The grouped op (labels in groups of ``group`` sharing a row of inputs) through autograd,
    against the float64 oracle of the plain op on the expanded indices."""
    from xmlsparse.ops.fixed_fanin.grouped import grouped_fixed_fanin

    n_groups = -(-n_labels // group)
    gen, act, indices, weight, bias, h, grad_out = problem(n_groups, fan_in, batch, kind, n_inputs, n_labels, dev, seed)
    oracle = Oracle(h, indices.repeat_interleave(group, dim=0)[:n_labels], weight, bias, grad_out, gen)
    leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    with PoisonedAllocations(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=kind == "bf16"):
        z = grouped_fixed_fanin(leaves[0], indices, leaves[1], leaves[2], group)
        z.backward(grad_out.to(z.dtype))
    errs = oracle.errors(z=z, grad_h=leaves[0].grad, grad_w=leaves[1].grad, grad_b=leaves[2].grad)
    return [dict(K=fan_in, B=batch, D=n_inputs, dtype=kind, path=f"grouped/G{group}", output=name, rel_err=err,
                 bound=BOUNDS[kind], ok=not math.isnan(err) and err <= BOUNDS[kind]) for name, err in errs.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=64 only, B in {7, 128}")
    parser.add_argument("--only", choices=("plain", "grouped"), help="check one op only")
    parser.add_argument("--labels", type=int, default=N_LABELS, help="L (default: Amazon-670K's)")
    parser.add_argument("--inputs", type=int, default=N_INPUTS, help="D")
    parser.add_argument("--device", default="cuda", help="cpu runs the Triton interpreter (small --labels)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "check_ops_gpu.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    fan_ins, batches = ((64,), (7, 128)) if args.quick else ((32, 64, 72), (1, 7, 128, 512))
    cases = [(k, b, kind, args.inputs) for k in fan_ins for b in batches for kind in ("fp32", "bf16")]
    if args.only == "grouped":
        cases = []
    elif not args.quick:
        # D = 2**20, and B * L past 2**31 (int64 offsets in the logits and gradients).
        cases += [(32, 32, "bf16", 2**20), (32, 4096, "bf16", args.inputs)]
    rows, start = [], time.time()
    for i, (k, b, kind, d) in enumerate(cases):
        rows += check_case(k, b, kind, d, args.labels, dev, seed=i)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    groups, fan_ins, batches = ((16, 32), (64,), (7, 128)) if args.quick else ((16, 32, 64), (32, 64, 128), (32, 128, 512))
    grouped = [(g, k, b, kind) for g in groups for k in fan_ins for b in batches for kind in ("fp32", "bf16")]
    if args.only == "plain":
        grouped = []
    for i, (g, k, b, kind) in enumerate(grouped):
        rows += check_grouped_case(g, k, b, kind, args.inputs, args.labels, dev, seed=1000 + i)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r for r in rows if not r["ok"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    args.out.write_text(json.dumps(dict(device=device_name, torch=torch.__version__, labels=args.labels,
                                        rows=rows, failed=len(failed), seconds=time.time() - start), indent=1))
    worst: dict[tuple, dict] = {}
    for r in rows:
        key = (r["dtype"], r["path"], r["output"])
        if key not in worst or not (r["rel_err"] <= worst[key]["rel_err"]):
            worst[key] = r
    print(f"\ncheck_ops_gpu: {len(rows)} checks over {len(cases) + len(grouped)} shapes, {len(failed)} failed "
          f"({time.time() - start:.0f} s, {device_name}, L={args.labels})")
    print(f"{'dtype':5} {'path':22} {'output':9} {'worst rel err':>13} {'at K,B,D':>16} {'bound':>7}")
    for (kind, path, name), r in sorted(worst.items()):
        print(f"{kind:5} {path:22} {name:9} {r['rel_err']:13.2e} {str((r['K'], r['B'], r['D'])):>16} {r['bound']:7.0e}")
    for r in failed:
        print("FAILED", r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
