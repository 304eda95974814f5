import pytest
import torch

from xmlsparse.ops.fixed_fanin import fixed_fanin as dispatched_fixed_fanin
from xmlsparse.ops.fixed_fanin import reference


def make_case(batch, n_inputs, n_labels, fan_in, dtype, seed=0, repeats=False, bias=True):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, n_inputs, generator=gen, dtype=dtype)
    if repeats:
        # Few distinct inputs per row, so most rows read some input more than once.
        indices = torch.randint(0, min(n_inputs, 3), (n_labels, fan_in), generator=gen, dtype=torch.int32)
    else:
        indices = torch.randint(0, n_inputs, (n_labels, fan_in), generator=gen, dtype=torch.int32)
    weight = torch.randn(n_labels, fan_in, generator=gen, dtype=dtype)
    b = torch.randn(n_labels, generator=gen, dtype=dtype) if bias else None
    return h, indices, weight, b


def dense_weight(indices, weight, n_inputs):
    """W_full [L, D] with repeated (l, d) pairs summed."""
    full = torch.zeros(indices.shape[0], n_inputs, dtype=weight.dtype)
    rows = torch.arange(indices.shape[0]).unsqueeze(1).expand_as(indices)
    full.index_put_((rows.reshape(-1), indices.reshape(-1).long()), weight.reshape(-1), accumulate=True)
    return full


def dense_outputs(h, indices, weight, bias, grad_out):
    """Forward and all gradients of the dense equivalent, via autograd on W_full."""
    h = h.detach().clone().requires_grad_(True)
    full = dense_weight(indices, weight, h.shape[1]).requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    z = h @ full.t() + (b if b is not None else 0)
    z.backward(grad_out)
    grad_w = full.grad.gather(1, indices.long())  # d z / d W[l, k] = d z / d W_full[l, I[l, k]]
    return z.detach(), h.grad, grad_w, None if b is None else b.grad


SHAPES = [
    dict(batch=7, n_inputs=129, n_labels=333, fan_in=72),
    dict(batch=7, n_inputs=129, n_labels=333, fan_in=1),
    dict(batch=1, n_inputs=129, n_labels=333, fan_in=72),
    dict(batch=5, n_inputs=17, n_labels=41, fan_in=9, repeats=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_layer(dtype, shape, bias):
    h, indices, weight, b = make_case(dtype=dtype, bias=bias, **shape)
    grad_out = torch.randn(h.shape[0], indices.shape[0], dtype=dtype, generator=torch.Generator().manual_seed(1))
    z_ref, gh_ref, gw_ref, gb_ref = dense_outputs(h, indices, weight, b, grad_out)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)

    z = reference.forward(h, indices, weight, b)
    assert z.dtype == dtype and z.shape == z_ref.shape
    torch.testing.assert_close(z, z_ref, **tol)
    torch.testing.assert_close(reference.grad_input(grad_out, indices, weight, h.shape[1]), gh_ref, **tol)
    torch.testing.assert_close(reference.grad_weight(grad_out, h, indices), gw_ref, **tol)

    hp = h.clone().requires_grad_(True)
    wp = weight.clone().requires_grad_(True)
    bp = None if b is None else b.clone().requires_grad_(True)
    reference.fixed_fanin(hp, indices, wp, bp).backward(grad_out)
    torch.testing.assert_close(hp.grad, gh_ref, **tol)
    torch.testing.assert_close(wp.grad, gw_ref, **tol)
    if bias:
        torch.testing.assert_close(bp.grad, gb_ref, **tol)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    h, indices, weight, b = make_case(3, 11, 13, 5, torch.float64, seed=3, bias=bias)
    indices[0, 1] = indices[0, 0]  # a repeat inside a row
    inputs = (h.requires_grad_(True), indices, weight.requires_grad_(True), b.requires_grad_(True) if bias else None)
    assert torch.autograd.gradcheck(reference.fixed_fanin, inputs)


def test_tiny_chunks_give_identical_results():
    h, indices, weight, b = make_case(7, 129, 333, 72, torch.float64, seed=5)
    grad_out = torch.randn(7, 333, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def all_outputs(chunk_elements=reference.CHUNK_ELEMENTS):
        return (
            reference.forward(h, indices, weight, b, chunk_elements),
            reference.grad_input(grad_out, indices, weight, 129, chunk_elements),
            reference.grad_weight(grad_out, h, indices, chunk_elements),
        )

    whole = all_outputs()
    # 7 * 72 = 504 elements per label: 5 labels per chunk, and 333 is no multiple of 5.
    assert reference.label_chunk(7, 72, 2600) == 5
    # Equal up to the summation order that matmul kernels pick for a given chunk size.
    for chunked, single in zip(all_outputs(2600), whole):
        torch.testing.assert_close(chunked, single, rtol=1e-13, atol=1e-13)


def test_only_needed_gradients_are_computed(monkeypatch):
    h, indices, weight, b = make_case(4, 20, 30, 6, torch.float32)
    calls = []
    monkeypatch.setattr(reference, "grad_input", lambda *a: calls.append("input") or torch.zeros(4, 20))
    monkeypatch.setattr(reference, "grad_weight", lambda *a: calls.append("weight") or torch.zeros(30, 6))
    reference.fixed_fanin(h, indices, weight.requires_grad_(True), b).sum().backward()
    assert calls == ["weight"]
    assert weight.grad is not None and b.grad is None


def test_bf16_accumulates_in_fp32():
    h, indices, weight, b = make_case(6, 64, 50, 48, torch.float32, seed=7)
    h16, w16, b16 = h.bfloat16(), weight.bfloat16(), b.bfloat16()
    z = reference.forward(h16, indices, w16, b16)
    assert z.dtype == torch.bfloat16
    exact = reference.forward(h16.double(), indices, w16.double(), b16.double())
    torch.testing.assert_close(z.double(), exact, rtol=8e-3, atol=8e-3)  # one bf16 rounding at the end
    assert reference.forward(h16, indices, weight, b).dtype == torch.float32  # promoted with W
    hp, wp = h16.clone().requires_grad_(True), w16.clone().requires_grad_(True)
    reference.fixed_fanin(hp, indices, wp, b16).sum().backward()
    assert hp.grad.dtype == torch.bfloat16 and wp.grad.dtype == torch.bfloat16


def test_dispatch_uses_reference_on_cpu():
    h, indices, weight, b = make_case(3, 10, 12, 4, torch.float32)
    torch.testing.assert_close(
        dispatched_fixed_fanin(h, indices, weight, b, impl="reference"), reference.forward(h, indices, weight, b)
    )
    torch.testing.assert_close(dispatched_fixed_fanin(h, indices, weight, b), reference.forward(h, indices, weight, b))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, i, w, b: (h[0], i, w, b), "h must be"),
        (lambda h, i, w, b: (h, i.float(), w, b), "integer"),
        (lambda h, i, w, b: (h, i, w[:, :-1], b), "weight shape"),
        (lambda h, i, w, b: (h, i, w, b[:-1]), "bias must be"),
    ],
)
def test_bad_shapes_are_named(change, message):
    args = change(*make_case(2, 10, 12, 4, torch.float32))
    with pytest.raises(ValueError, match=message):
        reference.fixed_fanin(*args)
