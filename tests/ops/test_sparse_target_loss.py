"""The Triton sparse-target losses (run by Triton's interpreter on CPU) against the torch losses."""

import pytest
import torch

from xmlsparse.ops import sparse_target_loss
from xmlsparse.ops.sparse_target_loss import SparseTargetLossTriton, loss_and_grad
from xmlsparse.train.losses import LOSSES, TRITON_LOSSES, label_positions, loss_fn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Both paths evaluate in float32; bf16 gradients may differ by the rounding of one bf16 ulp.
GRAD_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-9}, torch.bfloat16: {"rtol": 8e-3, "atol": 1e-9}}
# An upstream gradient other than 1 rounds the saved bf16 gradient a second time.
SCALED_GRAD_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-9}, torch.bfloat16: {"rtol": 16e-3, "atol": 1e-9}}


def random_labels(batch, n_labels, generator, max_labels=6):
    """CSR label rows with distinct ids; row 1 (when present) has no labels."""
    rows = []
    for row in range(batch):
        count = 0 if row == 1 else int(torch.randint(0, max_labels + 1, (1,), generator=generator))
        rows.append(torch.randperm(n_labels, generator=generator)[:count])
    y_ptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return torch.cat(rows).long(), y_ptr


def random_logits(batch, n_labels, dtype, generator):
    """Logits around the hinge (|z| ~ 1) with a few far out, where softplus and sigmoid saturate."""
    logits = torch.randn(batch, n_labels, generator=generator) * 2
    far = torch.rand(batch, n_labels, generator=generator) < 0.05
    logits[far] = torch.randn(int(far.sum()), generator=generator).sign() * 40
    return logits.to(dtype)


def torch_loss_and_grad(name, logits, y_indices, y_ptr, upstream=1.0):
    leaf = logits.detach().clone().requires_grad_()
    value = LOSSES[name](leaf, y_indices, y_ptr)
    (grad,) = torch.autograd.grad(upstream * value, leaf)
    return value.detach(), grad


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("n_labels", [1, 5, 333])
def test_loss_and_gradient_match_the_torch_loss(name, dtype, batch, n_labels):
    dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(1000 * batch + n_labels + (dtype == torch.bfloat16))
    y_indices, y_ptr = random_labels(batch, n_labels, generator, max_labels=min(6, n_labels))
    logits = random_logits(batch, n_labels, dtype, generator)
    rows, labels = label_positions(y_indices, y_ptr)
    expected, expected_grad = torch_loss_and_grad(name, logits, y_indices, y_ptr)

    value, grad = loss_and_grad(logits, rows, labels, name)
    assert value.dtype == torch.float32 and value.shape == () and grad.is_contiguous()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOLERANCE[dtype])

    # In place, over the [L, B] storage the head writes for training: the positives are read
    # before the negatives pass overwrites them, and every element becomes its gradient.
    transposed = logits.t().contiguous().t()
    value, grad = loss_and_grad(transposed, rows, labels, name, in_place=True)
    assert grad is transposed
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
def test_several_programs_and_label_lists(name, monkeypatch):
    monkeypatch.setattr(sparse_target_loss, "BLOCK_LOGITS", 32)  # 73 programs, the last one partial
    monkeypatch.setattr(sparse_target_loss, "BLOCK_POSITIVES", 4)
    generator = torch.Generator().manual_seed(3)
    y_indices, y_ptr = random_labels(7, 333, generator, max_labels=20)
    logits = random_logits(7, 333, torch.float32, generator)
    rows, labels = label_positions(y_indices, y_ptr)
    expected, expected_grad = torch_loss_and_grad(name, logits, y_indices, y_ptr)
    value, grad = loss_and_grad(logits.clone(), rows, labels, name, in_place=True)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
def test_rows_with_a_stride_and_no_labels_at_all(name):
    generator = torch.Generator().manual_seed(7)
    wide = random_logits(4, 300, torch.float32, generator)
    logits = wide[:, 17:250]  # row stride 300, last dim contiguous: copied first
    empty = torch.zeros(0, dtype=torch.long)
    value, grad = loss_and_grad(logits, empty, empty, name, in_place=True)
    expected, expected_grad = torch_loss_and_grad(name, logits, empty, torch.zeros(5, dtype=torch.long))
    assert grad.is_contiguous()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, **GRAD_TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_loss_fn_triton_backward_keeps_only_the_gradient(name, dtype):
    dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(11)
    y_indices, y_ptr = random_labels(5, 41, generator)
    logits = random_logits(5, 41, dtype, generator).requires_grad_()
    value = loss_fn(name, impl="triton")(logits, y_indices, y_ptr)
    assert type(value.grad_fn).__name__ == SparseTargetLossTriton.__name__ + "Backward"
    (saved,) = value.grad_fn.saved_tensors
    assert saved.data_ptr() != logits.data_ptr()  # the precomputed gradient, not the logits
    (3 * value).backward()  # the upstream gradient scales the saved one

    expected, expected_grad = torch_loss_and_grad(name, logits.detach(), y_indices, y_ptr, upstream=3.0)
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits.grad, expected_grad, **SCALED_GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
def test_consumed_logits_become_their_gradient(name):
    generator = torch.Generator().manual_seed(13)
    y_indices, y_ptr = random_labels(6, 50, generator)
    leaf = random_logits(6, 50, torch.bfloat16, generator).requires_grad_()
    logits = leaf.t().contiguous().t()  # the head's training layout, a non-leaf
    value = loss_fn(name, impl="triton", consume_logits=True)(logits, y_indices, y_ptr)
    (saved,) = value.grad_fn.saved_tensors
    assert saved.data_ptr() == logits.data_ptr()
    value.backward()
    expected, expected_grad = torch_loss_and_grad(name, leaf.detach(), y_indices, y_ptr)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(leaf.grad, expected_grad, **GRAD_TOLERANCE[torch.bfloat16])


def test_consuming_logits_that_autograd_saved_fails_loudly():
    generator = torch.Generator().manual_seed(17)
    y_indices, y_ptr = random_labels(3, 20, generator)
    leaf = random_logits(3, 20, torch.float32, generator).requires_grad_()
    logits = leaf * 1.0
    squared = logits * logits  # saves the logits for its backward
    value = loss_fn("bce", impl="triton", consume_logits=True)(logits, y_indices, y_ptr)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (value + squared.sum()).backward()


@pytest.mark.parametrize("name", sorted(TRITON_LOSSES))
def test_torch_path_takes_bf16_logits_as_their_float32_copy(name):
    """The trainer passes bf16 logits straight to the loss; the torch path must give what the
    float32 copy it used to make gave."""
    generator = torch.Generator().manual_seed(5)
    y_indices, y_ptr = random_labels(6, 77, generator)
    logits = random_logits(6, 77, torch.bfloat16, generator)
    direct = logits.clone().requires_grad_()
    value = loss_fn(name)(direct, y_indices, y_ptr)  # CPU logits: the torch path
    value.backward()
    copied = logits.clone().requires_grad_()
    expected = loss_fn(name)(copied.float(), y_indices, y_ptr)
    expected.backward()
    assert type(value.grad_fn).__name__ != SparseTargetLossTriton.__name__ + "Backward"
    assert value.dtype == torch.float32 and direct.grad.dtype == torch.bfloat16
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    torch.testing.assert_close(direct.grad, copied.grad, rtol=0, atol=0)


def test_bad_arguments_are_rejected():
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        loss_and_grad(torch.zeros(2, 3, dtype=torch.float64), empty, empty, "bce")
    with pytest.raises(ValueError, match="'hinge'"):
        loss_and_grad(torch.zeros(2, 3), empty, empty, "hinge")
    with pytest.raises(ValueError, match="impl"):
        loss_fn("bce", impl="cuda")
