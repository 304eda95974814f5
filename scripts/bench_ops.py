"""Benchmark the Triton fixed fan-in layer against torch.sparse, a dense layer and the reference op.

L = 670,091 (Amazon-670K). For every (D, K, B): forward, backward (grad_input + grad_weight +
grad_bias, the by-input index kept as a layer keeps it), forward+backward through autograd, the
by-input index rebuild, and torch.sparse (CSR SpMM forward; backward = SpMM with the transposed CSR, whose
values are re-gathered every step, plus sampled_addmm for the values' gradient). A dense bf16
layer ``x [B, 768] @ W^T, W [L, 768]`` per B, and the reference op on a few shapes (it is slow).

Activations and grad_out are bf16 and W fp32, as in training under bf16 autocast. Times are
medians of triton.testing.do_bench (L2 flushed before every call), rotating over 4 input sets.
GB/s counts the gather traffic: L*K*B*2 bytes per pass, 1 pass forward, 2 backward.

    PYTHONPATH=. python scripts/bench_ops.py            # full grid (about 5 min on an H100)
    PYTHONPATH=. python scripts/bench_ops.py --quick    # D=65536, K in {32, 64}, B in {32, 128}
    PYTHONPATH=. python scripts/bench_ops.py --sweep    # block shapes of each kernel at D=65536
    PYTHONPATH=. python scripts/bench_ops.py --grouped [--quick]  # grouped op (G = 16, 32, 64) beside the plain op
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from xmlsparse.ops.fixed_fanin import grouped, reference
from xmlsparse.ops.fixed_fanin import triton_op as ff
from xmlsparse.ops.fixed_fanin.by_input import ByInputCache, build_by_input_index
from xmlsparse.ops.fixed_fanin.plan import DEFAULT_PLAN, Blocks, Plan, padded_width

N_LABELS = 670_091
DENSE_HIDDEN = 768
N_SETS = 4
ACT = torch.bfloat16
# Targets on one H100 (forward ms) at D = 65,536.
TARGETS = {(65536, 64, 128): 1.5, (65536, 64, 32): 0.45, (65536, 32, 128): 0.8, (65536, 32, 32): 0.2}


def bench(fn, rep: int = 100, warmup: int = 25) -> float:
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth(dev: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    return 2 * buf.numel() / 1e9 / (bench(lambda: buf.clone(), rep=50) / 1e3)


def rotating(items):
    cycle = itertools.cycle(items)
    return lambda: next(cycle)


class Problem:
    """Indices, weights and N_SETS rotating (h, h^T, grad_out) sets of one shape."""

    def __init__(self, n_inputs: int, fan_in: int, batch: int, dev: torch.device):
        self.D, self.K, self.B, self.L = n_inputs, fan_in, batch, N_LABELS
        self.indices = torch.randint(0, n_inputs, (N_LABELS, fan_in), device=dev, dtype=torch.int32)
        self.weight = torch.randn(N_LABELS, fan_in, device=dev) / fan_in**0.5
        self.bias = torch.randn(N_LABELS, device=dev) * 0.1
        self.sets = []
        for _ in range(N_SETS):
            h = torch.randn(batch, n_inputs, device=dev).relu().to(ACT)
            self.sets.append((h, ff.transpose_padded(h), torch.randn(batch, N_LABELS, device=dev).to(ACT)))
        self.next_set = rotating(self.sets)

    def gathered_bytes(self) -> int:
        return self.L * self.K * self.B * torch.finfo(ACT).bits // 8


def time_triton(p: Problem) -> dict:
    out = {}
    out["fwd_ms"] = bench(lambda: ff.forward(p.next_set()[0], p.indices, p.weight, p.bias, out_dtype=ACT))

    cache = ByInputCache()

    def backward():
        _, h_t, g = p.next_set()
        return ff.backward(g, h_t, p.indices, p.weight, p.D, h_dtype=ACT, bias_dtype=torch.float32, by_input=cache)

    plan = DEFAULT_PLAN
    chunk = plan.by_input_chunk_labels(p.K, p.indices.device, p.B, ACT, with_grad_weight=p.B >= plan.fused_min_batch)
    out["index_build_ms"] = bench(lambda: build_by_input_index(p.indices, p.D, chunk), rep=50, warmup=5)
    out["index_chunks"] = cache.get(p.indices, p.D, chunk).n_chunks
    out["bwd_ms"] = bench(backward)
    weight = p.weight.clone().requires_grad_(True)
    bias = p.bias.clone().requires_grad_(True)
    leaves = [(s[0].clone().requires_grad_(True), s[2]) for s in p.sets]
    next_leaf = rotating(leaves)

    def fwd_bwd():
        h, g = next_leaf()
        with torch.autocast("cuda", dtype=ACT):
            z = ff.fixed_fanin(h, p.indices, weight, bias, by_input=cache)
        return torch.autograd.grad(z, (h, weight, bias), g)

    out["fwd_bwd_ms"] = bench(fwd_bwd)
    gb = p.gathered_bytes() / 1e9
    out["fwd_GBps"] = gb / (out["fwd_ms"] / 1e3)
    out["bwd_GBps"] = 2 * gb / (out["bwd_ms"] / 1e3)
    return out


def time_sparse(p: Problem) -> dict:
    """torch.sparse CSR with the same pattern; bf16 values where cuSPARSE takes them, else fp32."""
    dev = p.indices.device
    cols, order = p.indices.long().sort(dim=1)  # CSR rows with sorted columns
    values = p.weight.gather(1, order).reshape(-1)
    crow = torch.arange(0, p.L * p.K + 1, p.K, device=dev, dtype=torch.int32)
    col = cols.reshape(-1).to(torch.int32)
    by_input = torch.sort(col, stable=True)[1]
    crow_t = torch.zeros(p.D + 1, dtype=torch.int32, device=dev)
    crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=p.D), 0)
    row_t = (by_input // p.K).to(torch.int32)
    out = {}
    for dtype in (ACT, torch.float32):
        try:
            csr = torch.sparse_csr_tensor(crow, col, values.to(dtype), size=(p.L, p.D))

            def fwd():
                h = p.next_set()[0]
                return torch.sparse.mm(csr, h.t().to(dtype))

            def bwd():
                h, _, g = p.next_set()
                csr_t = torch.sparse_csr_tensor(crow_t, row_t, values[by_input].to(dtype), size=(p.D, p.L))
                grad_h_t = torch.sparse.mm(csr_t, g.t().to(dtype))
                grad_values = torch.sparse.sampled_addmm(csr, g.t().to(dtype), h.to(dtype), beta=0.0)
                return grad_h_t, grad_values

            fwd(), bwd()
            torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as err:
            out[f"error_{dtype}"] = str(err).splitlines()[0][:200]
            continue
        out.update(dtype=str(dtype).replace("torch.", ""), fwd_ms=bench(fwd, rep=60), bwd_ms=bench(bwd, rep=60))
        break
    return out


def time_reference(p: Problem) -> dict:
    weight = p.weight.clone().requires_grad_(True)
    bias = p.bias.clone().requires_grad_(True)
    h, _, g = p.sets[0]
    h = h.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return reference.fixed_fanin(h, p.indices, weight, bias)

    def fwd_bwd():
        z = reference.fixed_fanin(h, p.indices, weight, bias)
        return torch.autograd.grad(z, (h, weight, bias), g.to(z.dtype))

    return dict(fwd_ms=bench(fwd, rep=200, warmup=1), fwd_bwd_ms=bench(fwd_bwd, rep=400, warmup=1))


def time_dense(batch: int, dev: torch.device) -> dict:
    weight = torch.randn(N_LABELS, DENSE_HIDDEN, device=dev).to(ACT)
    xs = [torch.randn(batch, DENSE_HIDDEN, device=dev).to(ACT) for _ in range(N_SETS)]
    gs = [torch.randn(batch, N_LABELS, device=dev).to(ACT) for _ in range(N_SETS)]
    pairs = rotating(list(zip(xs, gs)))

    def bwd():
        x, g = pairs()
        return g @ weight, g.t() @ x

    fwd_ms = bench(lambda: pairs()[0] @ weight.t())
    bwd_ms = bench(bwd)
    return dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_bwd_ms=fwd_ms + bwd_ms)


def time_grouped(p: Problem, group: int) -> dict:
    """The grouped op (labels in groups of ``group`` sharing a row of inputs) on the problem's
    weights, with the first ceil(L / group) rows of its indices: forward, and forward + backward
    through autograd under bf16 autocast; GB/s counts the gathered ``L/G * K * B * 2`` bytes."""
    indices = p.indices[: -(-p.L // group)].contiguous()
    out = {"fwd_ms": bench(lambda: grouped.forward(p.next_set()[0], indices, p.weight, p.bias, group, ACT))}
    weight = p.weight.clone().requires_grad_(True)
    bias = p.bias.clone().requires_grad_(True)
    next_leaf = rotating([(s[0].clone().requires_grad_(True), s[2]) for s in p.sets])

    def fwd_bwd():
        h, g = next_leaf()
        with torch.autocast("cuda", dtype=ACT):
            z = grouped.grouped_fixed_fanin(h, indices, weight, bias, group)
        return torch.autograd.grad(z, (h, weight, bias), g)

    out["fwd_bwd_ms"] = bench(fwd_bwd)
    out["bwd_ms"] = out["fwd_bwd_ms"] - out["fwd_ms"]
    out["fwd_GBps"] = p.gathered_bytes() / group / 1e9 / (out["fwd_ms"] / 1e3)
    return out


def run_grouped(args, meta: dict, dev: torch.device, start: float) -> None:
    """Grouped rows beside the plain op and the dense bf16 layer, measured in the same run."""
    shapes = [(65536, 64, 128), (65536, 64, 32)] if args.quick else [(65536, k, b) for k in (32, 64, 128)
                                                                       for b in (32, 128, 512)]
    rows = []
    for n_inputs, fan_in, batch in shapes:
        p = Problem(n_inputs, fan_in, batch, dev)
        row = dict(D=n_inputs, K=fan_in, B=batch, plain=time_triton(p),
                   grouped={g: time_grouped(p, g) for g in grouped.GROUP_SIZES})
        rows.append(row)
        print(json.dumps(row), flush=True)
        del p
        torch.cuda.empty_cache()
    dense = {b: time_dense(b, dev) for b in sorted({r["B"] for r in rows})}
    args.out.write_text(json.dumps(dict(meta, grouped_rows=rows, dense=dense, seconds=time.time() - start), indent=1))
    print(f"\n{meta['device']}, L={meta['labels']}, bf16 activations, fp32 W; ms (median); fwd+bwd through autograd")
    print("| D | K | B | op | fwd ms | fwd GB/s | bwd ms | fwd+bwd ms | fwd x plain | bwd x plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        plain, d = r["plain"], dense[r["B"]]
        plain_bwd = plain["fwd_bwd_ms"] - plain["fwd_ms"]
        print(f"| {r['D']} | {r['K']} | {r['B']} | plain | {plain['fwd_ms']:.3f} | {plain['fwd_GBps']:.0f} "
              f"| {plain_bwd:.3f} | {plain['fwd_bwd_ms']:.3f} | 1 | 1 |")
        for g, t in r["grouped"].items():
            print(f"| {r['D']} | {r['K']} | {r['B']} | G={g} | {t['fwd_ms']:.3f} | {t['fwd_GBps']:.0f} | {t['bwd_ms']:.3f} "
                  f"| {t['fwd_bwd_ms']:.3f} | {plain['fwd_ms'] / t['fwd_ms']:.1f} | {plain_bwd / t['bwd_ms']:.1f} |")
        print(f"| {r['D']} | {r['K']} | {r['B']} | dense bf16 [L, 768] | {d['fwd_ms']:.3f} | - | {d['bwd_ms']:.3f} "
              f"| {d['fwd_bwd_ms']:.3f} | - | - |")


# --------------------------------------------------------------------------------------------
# Block-shape sweep
# --------------------------------------------------------------------------------------------


def _tiles(tiles, block_ks, block_bs):
    for block_b in block_bs:
        for block_k in block_ks:
            for tile in tiles:
                block_l = tile // (block_k * block_b)
                if 1 <= block_l <= 256:
                    yield Blocks(block_l, block_k, block_b, 4 if tile <= 8192 else 8)


def _sweep_family(rows, family, shape, configs, run, save) -> None:
    results = []
    for blk in configs:
        try:
            ms = bench(lambda: run(blk), rep=40, warmup=10)  # noqa: B023 (called at once)
        except Exception as err:  # noqa: BLE001 (a config the compiler rejects: out of resources, ...)
            print(f"  {family} {blk} failed: {str(err).splitlines()[0][:120]}")
            continue
        results.append((ms, blk))
        rows.append(dict(family=family, D=shape[0], K=shape[1], B=shape[2], ms=ms, **blk.__dict__))
    results.sort(key=lambda r: r[0])
    best = "  ".join(f"{ms:.3f} {b.block_l}x{b.block_k}x{b.block_b}/{b.num_warps}w" for ms, b in results[:4])
    print(f"sweep D={shape[0]} K={shape[1]} B={shape[2]} {family:12s} best: {best}", flush=True)
    save(rows)


def sweep_shape(p: Problem, rows: list[dict], save) -> None:
    """Block shapes of the forward and grad_weight gathers, and block shapes x label-chunk sizes of
    the fused by-input backward (grad_h + grad_W), at one shape."""
    shape = (p.D, p.K, p.B)
    bb = triton.next_power_of_2(padded_width(p.B))
    b_opts = sorted({min(bb, 128), min(bb, 64), min(bb, 32)}, reverse=True)
    _sweep_family(rows, "forward", shape, list(_tiles((4096, 8192, 16384), (4, 8, 16), b_opts[:2])),
                  lambda blk: ff.forward(p.next_set()[0], p.indices, p.weight, p.bias, out_dtype=ACT, blocks=blk),
                  save)
    _sweep_family(rows, "grad_weight", shape, list(_tiles((8192, 16384), (8, 16), b_opts[1:])),
                  lambda blk: ff.grad_weight(p.next_set()[2], p.sets[0][0], p.indices, out_dtype=torch.float32,
                                             blocks=blk), save)

    b_by_input = sorted({min(bb, 128), min(bb, 512)})
    by_input_configs = [Blocks(e, 1, b, w) for e in (4, 8, 16) for b in b_by_input for w in (1, 2) if e * b <= 4096]
    for share in (0.35, 0.5, 0.75):
        plan = Plan(by_input_l2_share=share)
        index = build_by_input_index(p.indices, p.D, plan.by_input_chunk_labels(p.K, p.indices.device, p.B, ACT))

        def fused(blk, plan=plan, index=index):
            _, h_t, g = p.next_set()
            grads = (torch.empty(p.B, p.D, dtype=ACT, device=g.device), torch.empty_like(p.weight))
            ff.grad_input_over_index(g, p.indices, p.weight, p.D, grads[0], index, plan, blocks=blk, h_t=h_t,
                                     grad_w=grads[1])

        _sweep_family(rows, f"fused_by_input/{share:g}/{index.n_chunks}ch", shape, by_input_configs, fused, save)
        del index


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D=65536, K in {32, 64}, B in {32, 128}")
    parser.add_argument("--sweep", action="store_true", help="time block shapes of every kernel instead")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) reference op")
    parser.add_argument("--grouped", action="store_true", help="the grouped op beside the plain op and a dense layer")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_ops.json")
    args = parser.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    meta = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d"), labels=N_LABELS)
    start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        def save(rows):
            args.out.write_text(json.dumps(dict(meta, sweep=rows, seconds=time.time() - start), indent=1))

        rows = []
        for shape in [(65536, 64, 128), (65536, 32, 32), (65536, 64, 32), (65536, 32, 512)]:
            sweep_shape(Problem(*shape, dev), rows, save)
            torch.cuda.empty_cache()
        return

    # Device ceilings: a device-to-device copy (bytes read + written) for the memory bound.
    meta["copy_GBps"] = copy_bandwidth(dev)
    if args.grouped:
        run_grouped(args, meta, dev, start)
        return

    if args.quick:
        grid = [(65536, k, b) for k in (32, 64) for b in (32, 128)]
    else:
        grid = [(d, k, b) for d in (32768, 65536, 131072) for k in (32, 64, 72) for b in (32, 128, 512)]
    reference_shapes = {(65536, 32, 32), (65536, 64, 128)} if not args.no_reference else set()
    rows = []
    for n_inputs, fan_in, batch in grid:
        p = Problem(n_inputs, fan_in, batch, dev)
        row = dict(D=n_inputs, K=fan_in, B=batch, triton=time_triton(p), sparse=time_sparse(p))
        if (n_inputs, fan_in, batch) in reference_shapes:
            row["reference"] = time_reference(p)
        rows.append(row)
        t, s = row["triton"], row["sparse"]
        print(f"D={n_inputs} K={fan_in} B={batch}: fwd {t['fwd_ms']:.3f} bwd {t['bwd_ms']:.3f} "
              f"fwd+bwd {t['fwd_bwd_ms']:.3f} ms; "
              f"sparse fwd {s.get('fwd_ms', float('nan')):.3f} bwd {s.get('bwd_ms', float('nan')):.3f}", flush=True)
        del p
        torch.cuda.empty_cache()
    dense = {b: time_dense(b, dev) for b in sorted({r["B"] for r in rows})}
    args.out.write_text(json.dumps(dict(meta, rows=rows, dense=dense, seconds=time.time() - start), indent=1))
    print_table(meta, rows, dense)
    print(f"({time.time() - start:.0f} s; JSON: {args.out})")


def print_table(meta: dict, rows: list[dict], dense: dict) -> None:
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, L={meta['labels']}, "
          f"copy {meta['copy_GBps']:.0f} GB/s; ms (median); GB/s = gathered L*K*B*2 bytes per pass "
          f"(1 forward, 2 backward); index = by-input index rebuild (chunks)")
    print("| D | K | B | fwd ms | fwd GB/s | bwd ms | bwd/fwd | fwd+bwd | index ms "
          "| sparse fwd / bwd | x sparse fwd / bwd | dense fwd / bwd | ref fwd / fwd+bwd (x) | fwd target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, s, d = r["triton"], r["sparse"], dense[r["B"]]
        ref = r.get("reference")
        ref_txt = "-"
        if ref:
            ref_txt = (f"{ref['fwd_ms']:.1f} ({ref['fwd_ms'] / t['fwd_ms']:.0f}x) / "
                       f"{ref['fwd_bwd_ms']:.1f} ({ref['fwd_bwd_ms'] / t['fwd_bwd_ms']:.0f}x)")
        target = TARGETS.get((r["D"], r["K"], r["B"]))
        target_txt = "-" if target is None else f"{target} {'ok' if t['fwd_ms'] <= target else 'MISS'}"
        sp_f, sp_b = s.get("fwd_ms", float("nan")), s.get("bwd_ms", float("nan"))
        print(f"| {r['D']} | {r['K']} | {r['B']} | {t['fwd_ms']:.3f} | {t['fwd_GBps']:.0f} | {t['bwd_ms']:.3f} "
              f"| {t['bwd_ms'] / t['fwd_ms']:.2f} | {t['fwd_bwd_ms']:.3f} | {t['index_build_ms']:.1f} ({t['index_chunks']}) "
              f"| {sp_f:.2f} / {sp_b:.2f} {s.get('dtype', '')} | {sp_f / t['fwd_ms']:.0f} / {sp_b / t['bwd_ms']:.0f} "
              f"| {d['fwd_ms']:.2f} / {d['bwd_ms']:.2f} | {ref_txt} | {target_txt} |")


if __name__ == "__main__":
    main()
