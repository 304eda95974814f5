"""The grouped fixed fan-in op (labels in groups of G share a row of inputs): the reference against
a float64 per-label expansion, and the Triton kernels, through the interpreter, against the
reference on shapes that are multiples of no block, a partial last group, B = 1 and repeated
inputs in a row; every buffer the op allocates starts as NaN."""

import os

import pytest
import torch

from xmlsparse.ops.fixed_fanin import fixed_fanin, reference

SHAPES = [  # (L, K, D, B, G)
    (333, 32, 129, 7, 16),  # partial last group (333 = 20 * 16 + 13)
    (70, 16, 33, 1, 32),  # B = 1, partial group
    (128, 48, 61, 130, 64),  # several batch blocks, K of three dot tiles
]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def problem(n_labels, fan_in, n_inputs, batch, group, h_dtype, w_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-n_labels // group)
    indices = torch.randint(0, n_inputs, (n_groups, fan_in), generator=gen, dtype=torch.int32)
    indices[::2, 1] = indices[::2, 0]  # repeated inputs within a row
    weight = torch.randn(n_labels, fan_in, generator=gen).to(w_dtype)
    bias = torch.randn(n_labels, generator=gen).to(w_dtype)
    h = torch.randn(batch, n_inputs, generator=gen).to(h_dtype)
    grad_out = torch.randn(batch, n_labels, generator=gen)
    return indices, weight, bias, h, grad_out


def test_reference_equals_the_plain_op_on_expanded_indices():
    indices, weight, bias, h, grad_out = problem(45, 6, 11, 5, 4, torch.float64, torch.float64)
    expanded = indices.repeat_interleave(4, dim=0)[:45]
    leaves = [t.clone().requires_grad_() for t in (h, weight, bias)]
    z = reference.fixed_fanin(leaves[0], indices, leaves[1], leaves[2], group_size=4, chunk_elements=7 * 6 * 5)
    z.backward(grad_out.double())
    plain = [t.clone().requires_grad_() for t in (h, weight, bias)]
    z_plain = reference.fixed_fanin(plain[0], expanded, plain[1], plain[2])
    z_plain.backward(grad_out.double())
    torch.testing.assert_close(z, z_plain)
    for got, want in zip(leaves, plain):
        torch.testing.assert_close(got.grad, want.grad)


def test_shapes_are_checked():
    weight = torch.randn(33, 16)
    with pytest.raises(ValueError, match=r"needs indices of shape \(3, 16\) \(group_size 16\)"):
        reference.fixed_fanin(torch.randn(2, 20), torch.zeros(2, 16, dtype=torch.int32), weight, group_size=16)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        reference.fixed_fanin(torch.randn(2, 20), torch.zeros(3, 16, dtype=torch.int32), weight, group_size=0)


def _poisoned(factory):
    def make(*args, **kwargs):
        t = factory(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30))

    return make


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel tests run in Triton's interpreter")
@pytest.mark.parametrize("shape", SHAPES, ids=["L333-K32-G16", "B1-G32", "B130-K48-G64"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=["h32-w32", "h16-w32", "h16-w16"])
def test_triton_grouped_matches_the_reference(shape, dtypes, monkeypatch):
    pytest.importorskip("triton")
    n_labels, fan_in, n_inputs, batch, group = shape
    indices, weight, bias, h, grad_out = problem(*shape, *dtypes)
    leaves = [t.clone().requires_grad_(True) for t in (h, weight, bias)]
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    z = fixed_fanin(leaves[0], indices, leaves[1], leaves[2], impl="triton", group_size=group)
    z.backward(grad_out.to(z.dtype))
    monkeypatch.undo()
    oracle = [t.double().requires_grad_(True) for t in (h, weight, bias)]
    z_ref = reference.fixed_fanin(oracle[0], indices, oracle[1], oracle[2], group_size=group)
    z_ref.backward(grad_out.to(z.dtype).double())
    tol = 1e-5 if dtypes == (torch.float32, torch.float32) else 2e-2
    for name, got, want in (("z", z, z_ref), *zip(("grad_h", "grad_W", "grad_bias"), (t.grad for t in leaves),
                                                  (t.grad for t in oracle))):
        assert torch.isfinite(got).all(), f"{name}: unwritten or non-finite elements"
        err = (got.double() - want.detach()).norm() / want.detach().norm()
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"
    assert leaves[1].grad.dtype == leaves[1].dtype and leaves[0].grad.dtype == leaves[0].dtype


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel tests run in Triton's interpreter")
def test_triton_grouped_refuses_what_it_has_no_kernels_for():
    pytest.importorskip("triton")
    h = torch.randn(3, 40)
    with pytest.raises(ValueError, match="kernels for 16, 32, 64"):
        fixed_fanin(h, torch.zeros(3, 16, dtype=torch.int32), torch.randn(24, 16), impl="triton", group_size=8)
    with pytest.raises(ValueError, match="multiple of 16"):
        fixed_fanin(h, torch.zeros(2, 24, dtype=torch.int32), torch.randn(24, 24), impl="triton", group_size=16)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel tests run in Triton's interpreter")
@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)],
                         ids=["h", "W", "bias", "h-bias"])
def test_triton_grouped_backward_computes_only_the_gradients_asked_for(wanted):
    """The one backward pass compiles out the gradients no leaf needs; the ones asked for are exact."""
    pytest.importorskip("triton")
    indices, weight, bias, h, grad_out = problem(*SHAPES[0], torch.float32, torch.float32)
    leaves = [t.clone().requires_grad_(w) for t, w in zip((h, weight, bias), wanted)]
    z = fixed_fanin(leaves[0], indices, leaves[1], leaves[2], impl="triton", group_size=SHAPES[0][-1])
    z.backward(grad_out)
    oracle = [t.double().requires_grad_(True) for t in (h, weight, bias)]
    reference.fixed_fanin(oracle[0], indices, oracle[1], oracle[2], group_size=SHAPES[0][-1]).backward(grad_out.double())
    for leaf, want, asked in zip(leaves, oracle, wanted):
        if not asked:
            assert leaf.grad is None
            continue
        err = (leaf.grad.double() - want.grad).norm() / want.grad.norm()
        assert err <= 1e-5, f"relative error {err:.3g}"
