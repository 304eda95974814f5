import pytest
import torch

from xmlsparse.config import CHOICES
from xmlsparse.errors import XMLSparseError
from xmlsparse.train import losses
from xmlsparse.train.losses import bce_loss, label_positions, loss_fn, softmax_loss, squared_hinge_loss


def dense_targets(y_indices, y_ptr, n_labels):
    """Test oracle only: the dense 0/1 target matrix the real losses never build."""
    targets = torch.zeros(y_ptr.numel() - 1, n_labels, dtype=torch.float64)
    for row in range(y_ptr.numel() - 1):
        targets[row, y_indices[y_ptr[row] : y_ptr[row + 1]]] = 1
    return targets


def dense_squared_hinge(logits, targets):
    signs = 2 * targets - 1
    return torch.relu(1 - signs * logits).square().mean()


def dense_bce(logits, targets):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)


def dense_softmax(logits, targets):
    """Cross-entropy against each row's labels spread evenly; rows without labels add 0."""
    counts = targets.sum(1, keepdim=True)
    spread = torch.where(counts > 0, targets / counts.clamp(min=1), torch.zeros_like(targets))
    return -(spread * torch.log_softmax(logits, dim=1)).sum() / logits.shape[0]


CASES = {"squared-hinge": dense_squared_hinge, "bce": dense_bce, "softmax": dense_softmax}


def random_labels(batch, n_labels, generator, max_labels=4):
    """CSR label rows with distinct ids; row 1 (when present) has no labels."""
    rows = []
    for row in range(batch):
        count = 0 if row == 1 else int(torch.randint(0, max_labels + 1, (1,), generator=generator))
        rows.append(torch.randperm(n_labels, generator=generator)[:count].sort().values)
    y_ptr = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
    return torch.cat(rows).long(), y_ptr


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch,n_labels", [(1, 7), (6, 13), (5, 1)])
def test_value_and_gradient_match_the_dense_loss(name, batch, n_labels):
    generator = torch.Generator().manual_seed(batch * 100 + n_labels)
    y_indices, y_ptr = random_labels(batch, n_labels, generator)
    logits = (torch.randn(batch, n_labels, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    loss = loss_fn(name)(logits, y_indices, y_ptr)
    (grad,) = torch.autograd.grad(loss, logits)

    reference_logits = logits.detach().clone().requires_grad_()
    expected = CASES[name](reference_logits, dense_targets(y_indices, y_ptr, n_labels))
    (expected_grad,) = torch.autograd.grad(expected, reference_logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_chunked_rows_and_no_labels_at_all(name, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 10)  # several rows per chunk, then one per chunk
    generator = torch.Generator().manual_seed(0)
    for batch, n_labels, max_labels in [(9, 4, 2), (3, 25, 5), (4, 6, 0)]:
        y_indices, y_ptr = random_labels(batch, n_labels, generator, max_labels)
        logits = torch.randn(batch, n_labels, generator=generator).requires_grad_()
        loss = loss_fn(name)(logits, y_indices, y_ptr)
        loss.backward()
        reference = logits.detach().double().requires_grad_()
        expected = CASES[name](reference, dense_targets(y_indices, y_ptr, n_labels))
        expected.backward()
        assert loss.dtype == torch.float32 and logits.grad.dtype == torch.float32
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=1e-5, atol=1e-7)


def test_bfloat16_logits_get_a_float32_loss_and_bf16_gradient():
    generator = torch.Generator().manual_seed(1)
    y_indices, y_ptr = random_labels(4, 10, generator)
    logits = torch.randn(4, 10, generator=generator).bfloat16().requires_grad_()
    loss = squared_hinge_loss(logits, y_indices, y_ptr)
    loss.backward()
    expected = dense_squared_hinge(logits.detach().double(), dense_targets(y_indices, y_ptr, 10))
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_gradcheck_through_a_layer():
    generator = torch.Generator().manual_seed(2)
    y_indices, y_ptr = random_labels(3, 5, generator)
    h = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    for fn in (squared_hinge_loss, bce_loss, softmax_loss):
        assert torch.autograd.gradcheck(lambda h, w: fn(h @ w.t(), y_indices, y_ptr), (h, weight))


def test_label_positions():
    rows, labels = label_positions(torch.tensor([4, 0, 2, 9]), torch.tensor([0, 1, 1, 4]))
    assert rows.tolist() == [0, 2, 2, 2] and labels.tolist() == [4, 0, 2, 9]


def test_unknown_loss_names_the_options():
    with pytest.raises(XMLSparseError, match=r"'hinge'.*squared-hinge, bce, softmax"):
        loss_fn("hinge")


def test_softmax_of_a_single_label_is_the_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    loss = softmax_loss(logits, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))


def test_softmax_bf16_and_huge_logits_stay_finite():
    generator = torch.Generator().manual_seed(4)
    y_indices, y_ptr = random_labels(4, 12, generator)
    logits = (torch.randn(4, 12, generator=generator) * 200).bfloat16().requires_grad_()
    loss = softmax_loss(logits, y_indices, y_ptr)
    loss.backward()
    expected = dense_softmax(logits.detach().double(), dense_targets(y_indices, y_ptr, 12))
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-4)


def test_mismatched_label_rows_are_rejected():
    with pytest.raises(ValueError, match="row pointers"):
        bce_loss(torch.zeros(3, 4), torch.tensor([1]), torch.tensor([0, 1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_bf16_logits_match_the_cpu_loss(name):
    generator = torch.Generator().manual_seed(3)
    y_indices, y_ptr = random_labels(8, 50_000, generator, max_labels=20)
    logits = torch.randn(8, 50_000, generator=generator).bfloat16()
    cpu = logits.float().requires_grad_()
    expected = loss_fn(name)(cpu, y_indices, y_ptr)
    expected.backward()
    cuda = logits.cuda().requires_grad_()
    loss = loss_fn(name)(cuda, y_indices.cuda(), y_ptr.cuda())
    loss.backward()
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cuda.grad.float().cpu(), cpu.grad, rtol=1e-2, atol=1e-9)


def test_every_loss_a_config_may_name_exists_and_no_other():
    assert tuple(losses.LOSSES) == CHOICES["train.loss"]
