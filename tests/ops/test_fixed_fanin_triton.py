"""Triton fixed fan-in kernels against the float64 reference op, on CPU through the Triton interpreter.

Shapes are small (the interpreter runs every program in numpy) and are multiples of no block size.
Every output buffer is filled with NaN first, so an element the kernels never write fails the test.
"""

import os

import pytest
import torch

# tests/conftest.py chooses the interpreter before anything imports triton.
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernel tests run in Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
pytest.importorskip("triton")

from xmlsparse.ops.fixed_fanin import reference  # noqa: E402
from xmlsparse.ops.fixed_fanin import triton_op as ff  # noqa: E402
from xmlsparse.ops.fixed_fanin.by_input import ByInputCache, build_by_input_index  # noqa: E402
from xmlsparse.ops.fixed_fanin.plan import Blocks, Plan  # noqa: E402

# (L, K, D, B): ragged shapes, K = 1, B = 1, a batch over 16 (padded h^T rows), several batch blocks.
SHAPES = [(333, 72, 129, 7), (41, 1, 17, 1), (37, 5, 9, 20), (29, 3, 11, 130)]
SHAPE_IDS = ["L333-K72-D129-B7", "K1-B1", "B20-repeats", "B130"]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
DTYPE_IDS = ["h32-w32", "h16-w32", "h16-w16"]


def _generator() -> torch.Generator:
    gen = torch.Generator()
    gen.seed()  # fresh data every run; the seed is printed on failure
    return gen


def _problem(shape, h_dtype, w_dtype, gen):
    n_labels, fan_in, n_inputs, batch = shape
    indices = torch.randint(0, n_inputs, (n_labels, fan_in), generator=gen, dtype=torch.int32)
    if fan_in > 1:
        indices[::3, 1] = indices[::3, 0]  # repeated inputs within a row
    weight = torch.randn(n_labels, fan_in, generator=gen).to(w_dtype)
    bias = torch.randn(n_labels, generator=gen).to(w_dtype)
    h = torch.randn(batch, n_inputs, generator=gen).to(h_dtype)
    grad_out = torch.randn(batch, n_labels, generator=gen)
    return indices, weight, bias, h, grad_out


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _tolerance(*dtypes: torch.dtype) -> float:
    return 1e-5 if all(d == torch.float32 for d in dtypes) else 1e-2


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str, gen: torch.Generator) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: unwritten or non-finite elements (seed {gen.initial_seed()})"
    err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
def test_forward(shape, dtypes):
    gen = _generator()
    indices, weight, bias, h, _ = _problem(shape, *dtypes, gen)
    out_dtype = torch.promote_types(*dtypes)
    z = ff.forward(h, indices, weight, bias, out=_nan((h.shape[0], indices.shape[0]), out_dtype))
    want = reference.forward(h.double(), indices, weight.double(), bias.double())
    assert z.dtype == out_dtype
    _assert_close(z, want, _tolerance(out_dtype), "z", gen)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_grad_weight(shape, dtypes):
    gen = _generator()
    indices, _, _, h, grad_out = _problem(shape, *dtypes, gen)
    grad_out = grad_out.to(dtypes[0])
    gw = ff.grad_weight(grad_out, h, indices, out=_nan(tuple(indices.shape), torch.float32), out_dtype=torch.float32)
    want = reference.grad_weight(grad_out.double(), h.double(), indices)
    _assert_close(gw, want, _tolerance(dtypes[0]), "grad_W", gen)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtypes", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_grad_input(shape, dtypes):
    gen = _generator()
    indices, weight, _, h, grad_out = _problem(shape, *dtypes, gen)
    grad_out = grad_out.to(dtypes[0])
    n_inputs = h.shape[1]
    gh = ff.grad_input(grad_out, indices, weight, n_inputs,
                       out=_nan((h.shape[0], n_inputs), torch.float32), out_dtype=torch.float32)
    want = reference.grad_input(grad_out.double(), indices, weight.double(), n_inputs)
    _assert_close(gh, want, _tolerance(dtypes[0]), "grad_h", gen)


def test_grad_input_over_several_label_chunks():
    gen = _generator()
    indices, weight, _, h, grad_out = _problem(SHAPES[0], torch.float32, torch.float32, gen)
    n_inputs = h.shape[1]
    cache = ByInputCache()
    # A plan whose L2 holds the rows of about 100 labels: the by-input index has 4 chunks.
    per_label = 7 * 4 + 72 * 4
    plan = Plan(l2_bytes_default=2 * 100 * per_label)
    gh = ff.grad_input(grad_out, indices, weight, n_inputs, out=_nan((h.shape[0], n_inputs), torch.float32),
                       plan=plan, by_input=cache)
    assert cache.index.n_chunks == 4
    want = reference.grad_input(grad_out.double(), indices, weight.double(), n_inputs)
    _assert_close(gh, want, 1e-5, "grad_h (4 chunks)", gen)


def test_fused_backward_over_several_batch_blocks():
    """grad_W from the by-input pass, added atomically when the batch spans two blocks."""
    gen = _generator()
    indices, weight, _, h, grad_out = _problem(SHAPES[3], torch.float32, torch.float32, gen)
    n_inputs = h.shape[1]
    gh = _nan((h.shape[0], n_inputs), torch.float32)
    gw = _nan(tuple(weight.shape), torch.float32)
    index = build_by_input_index(indices, n_inputs, chunk_labels=indices.shape[0])
    ff.grad_input_over_index(grad_out, indices, weight, n_inputs, gh, index, Plan(), blocks=Blocks(8, 1, 128, 1),
                             h_t=ff.transpose_padded(h), grad_w=gw)
    _assert_close(gh, reference.grad_input(grad_out.double(), indices, weight.double(), n_inputs), 1e-5, "grad_h", gen)
    _assert_close(gw, reference.grad_weight(grad_out.double(), h.double(), indices), 1e-5, "grad_W", gen)


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30))

    return make


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[1], SHAPE_IDS[3]])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2]], ids=[DTYPE_IDS[0], DTYPE_IDS[2]])
@pytest.mark.parametrize("fused_min_batch", [128, 1], ids=["split-grad-w", "fused-grad-w"])
def test_autograd_matches_reference(shape, dtypes, fused_min_batch, monkeypatch):
    gen = _generator()
    indices, weight, bias, h, grad_out = _problem(shape, *dtypes, gen)
    # Every buffer the op allocates starts as NaN (integers as a large negative number).
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    z = ff.fixed_fanin(leaves[0], indices, leaves[1], leaves[2], plan=Plan(fused_min_batch=fused_min_batch))
    z.backward(grad_out.to(z.dtype))
    monkeypatch.undo()

    oracle = [t.double().requires_grad_(True) for t in (h, weight, bias)]
    z_ref = reference.fixed_fanin(oracle[0], indices, oracle[1], oracle[2])
    z_ref.backward(grad_out.to(z.dtype).double())
    tol = _tolerance(*dtypes)
    _assert_close(z, z_ref.detach(), tol, "z", gen)
    for name, got, want in zip(("grad_h", "grad_W", "grad_bias"), leaves, oracle):
        assert got.grad.dtype == got.dtype, f"{name} dtype {got.grad.dtype} != {got.dtype}"
        _assert_close(got.grad, want.grad, tol, name, gen)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[2]], ids=[DTYPE_IDS[0], DTYPE_IDS[2]])
def test_small_l2_paths(dtypes):
    """An L2 this small cuts the labels of the by-input grad_input into chunks and, with float32 h,
    makes the forward run batch block after batch block and grad_weight split the batch in two."""
    gen = _generator()
    indices, weight, bias, h, grad_out = _problem(SHAPES[3], *dtypes, gen)
    cache = ByInputCache()
    leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    z = ff.fixed_fanin(leaves[0], indices, leaves[1], leaves[2], by_input=cache,
                       plan=Plan(l2_bytes_default=3 * 11 * 4 * 128))
    z.backward(grad_out.to(z.dtype))
    assert cache.index.n_chunks > 1
    oracle = [t.double().requires_grad_(True) for t in (h, weight, bias)]
    z_ref = reference.fixed_fanin(oracle[0], indices, oracle[1], oracle[2])
    z_ref.backward(grad_out.to(z.dtype).double())
    tol = _tolerance(*dtypes)
    _assert_close(z, z_ref.detach(), tol, "z", gen)
    for name, got, want in zip(("grad_h", "grad_W", "grad_bias"), leaves, oracle):
        _assert_close(got.grad, want.grad, tol, name, gen)


def test_autocast_runs_in_bf16_and_keeps_weight_dtype():
    gen = _generator()
    indices, weight, bias, h, grad_out = _problem(SHAPES[0], torch.float32, torch.float32, gen)
    h = h.requires_grad_(True)
    weight = weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = ff.fixed_fanin(h, indices, weight, bias)
    assert z.dtype == torch.bfloat16
    z.backward(grad_out.to(torch.bfloat16))
    assert h.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    want = reference.forward(h.detach().to(torch.bfloat16).double(), indices, weight.detach().double(), bias.double())
    _assert_close(z, want, 1e-2, "z under autocast", gen)


def test_by_input_cache_keeps_its_index_until_dropped():
    gen = _generator()
    indices, weight, _, h, grad_out = _problem(SHAPES[0], torch.float32, torch.float32, gen)
    n_inputs = h.shape[1]
    cache = ByInputCache()
    first = cache.get(indices, n_inputs, chunk_labels=1000)
    assert cache.get(indices, n_inputs, chunk_labels=1000) is first and cache.nbytes == first.nbytes > 0
    assert cache.get(indices, n_inputs, chunk_labels=200) is not first  # chunks too large for this batch
    with torch.no_grad():
        indices[:, 0] = (indices[:, 0] + 1) % n_inputs  # what rewiring does, then drops the index
    cache.drop()
    assert cache.nbytes == 0
    gh = ff.grad_input(grad_out, indices, weight, n_inputs, by_input=cache)
    want = reference.grad_input(grad_out.double(), indices, weight.double(), n_inputs)
    _assert_close(gh, want, 1e-5, "grad_h after rewiring", gen)


def test_by_input_index_groups_slots_by_chunk_and_input():
    indices = torch.tensor([[2, 0], [2, 2], [1, 0]], dtype=torch.int32)
    index = build_by_input_index(indices, n_inputs=3, chunk_labels=2)
    assert index.n_chunks == 2
    # chunk 0 (labels 0, 1): input 0 <- slot 1; input 2 <- slots 0, 2, 3. Chunk 1: input 0 <- 5, 1 <- 4.
    assert index.offsets.tolist() == [0, 1, 1, 4, 5, 6, 6]
    assert index.slots.tolist() == [1, 0, 2, 3, 5, 4]


def test_bad_inputs_raise():
    h = torch.randn(3, 5)
    indices = torch.zeros(4, 2, dtype=torch.int32)
    weight = torch.randn(4, 2)
    with pytest.raises(ValueError, match="int32"):
        ff.fixed_fanin(h, indices.long(), weight)
    with pytest.raises(ValueError, match="weight shape"):
        ff.fixed_fanin(h, indices, weight[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        build_by_input_index(indices + 5, 5, chunk_labels=4)
