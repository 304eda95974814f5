"""CompactAdam (bf16 moments) against torch's Adam, its checkpoints, and the fixed fan-in head
that takes its Adam step inside its own backward (Triton kernels interpreted on CPU)."""

import copy

import pytest
import torch

from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.ops.fixed_fanin.plan import Plan
from xmlsparse.train.compact_adam import AdamGradSink, CompactAdam


class RecordingSink(AdamGradSink):
    """``AdamGradSink`` that notes the size of each range it is handed."""

    def __init__(self, optimizer, param, held):
        super().__init__(optimizer, param)
        self.held = held

    def take(self, start, stop, grad):
        self.held.append(grad.numel())
        super().take(start, stop, grad)


class BufferedSink:
    """``AdamGradSink`` without ``take_fused``: the op hands it buffered ranges only."""

    def __init__(self, optimizer, param):
        self.inner = AdamGradSink(optimizer, param)
        self.dtype = self.inner.dtype

    def open(self):
        self.inner.open()

    def take(self, start, stop, grad):
        self.inner.take(start, stop, grad)


def quadratic_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(40, 7, generator=gen)
    start = torch.randn(40, 7, generator=gen)
    return target, start


@pytest.mark.parametrize("decoupled", [False, True])
def test_tracks_torch_adam(decoupled):
    target, start = quadratic_problem()
    ours = start.clone().requires_grad_()
    theirs = start.clone().requires_grad_()
    opt = CompactAdam([ours], lr=1e-2, weight_decay=0.01, decoupled=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    ref = cls([theirs], lr=1e-2, weight_decay=0.01)
    for _ in range(50):
        for p, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    assert opt.state[ours]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[ours]["step"] == 50
    # bf16 moments (8 significant bits) move each step's update by well under 1 %.
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=5e-3)


def test_resume_from_state_dict_repeats_the_run():
    target, start = quadratic_problem(1)

    def run(steps, param, opt):
        for _ in range(steps):
            opt.zero_grad()
            ((param - target) ** 2).sum().backward()
            opt.step()

    straight = start.clone().requires_grad_()
    opt = CompactAdam([straight], lr=1e-2, seed=3)
    run(20, straight, opt)

    resumed = start.clone().requires_grad_()
    first = CompactAdam([resumed], lr=1e-2, seed=3)
    run(10, resumed, first)
    saved = copy.deepcopy(first.state_dict())
    second = CompactAdam([resumed], lr=1e-2, seed=3)
    second.load_state_dict(saved)
    assert second.state[resumed]["exp_avg"].dtype == torch.bfloat16  # not cast to the weight's fp32
    run(10, resumed, second)
    assert torch.equal(straight, resumed)


def test_skips_parameters_without_gradient_and_rejects_strangers():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    opt = CompactAdam([a])
    opt.step()
    assert not opt.state[a]
    with pytest.raises(ValueError, match="not managed"):
        AdamGradSink(opt, b)
    with pytest.raises(ValueError, match="invalid Adam settings"):
        CompactAdam([a], betas=(0.9, 1.0))


def head_problem(batch: int, impl: str, n_labels=37, n_inputs=29, fan_in=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = FixedFanInLinear(n_inputs, n_labels, fan_in, impl=impl, generator=gen)
    h = torch.randn(batch, n_inputs, generator=gen)
    grad_out = torch.randn(batch, n_labels, generator=gen)
    return layer, h, grad_out


@pytest.mark.parametrize(
    ("impl", "batch"),
    [
        ("triton", 5),  # by-input grad_h, then the grad_W pass taking the Adam step
        ("triton", 130),  # grad_W from the by-input pass
        ("triton", 600),  # more than one batch block: grad_W summed in fp32 first
        ("reference", 5),
    ],
)
def test_head_update_in_backward_equals_a_plain_step(impl, batch):
    fused, h, grad_out = head_problem(batch, impl)
    plain = copy.deepcopy(fused)
    fused_opt = CompactAdam(fused.parameters(), lr=0.05, weight_decay=0.01)
    plain_opt = CompactAdam(plain.parameters(), lr=0.05, weight_decay=0.01)
    fused.grad_weight_sink = AdamGradSink(fused_opt, fused.weight)
    for step in range(3):
        if step:
            # Start both from the same state: the moments' rounding bits differ between the paths.
            with torch.no_grad():
                fused.weight.copy_(plain.weight)
                for name in ("exp_avg", "exp_avg_sq"):
                    fused_opt.state[fused.weight][name].copy_(plain_opt.state[plain.weight][name])
        before = plain.weight.detach().clone()
        h_fused = h.clone().requires_grad_()
        h_plain = h.clone().requires_grad_()
        for layer, opt, x in ((fused, fused_opt, h_fused), (plain, plain_opt, h_plain)):
            opt.zero_grad()
            layer(x).backward(grad_out * (step + 1))
        assert fused.weight.grad is None and plain.weight.grad is not None
        # grad_h reads the weights before this step's update.
        torch.testing.assert_close(h_fused.grad, h_plain.grad, rtol=1e-5, atol=1e-6)
        fused_opt.step()
        # The backward's update reads the weight gradient rounded to bf16.
        plain.weight.grad.copy_(plain.weight.grad.to(torch.bfloat16))
        plain_opt.step()
        # The two bf16 roundings of the gradient (kernel store, torch cast) may differ by a step.
        torch.testing.assert_close(fused.weight - before, plain.weight - before, rtol=0.02, atol=5e-5)
        torch.testing.assert_close(fused.bias, plain.bias, rtol=1e-4, atol=1e-6)
        for name in ("exp_avg", "exp_avg_sq"):
            got, want = fused_opt.state[fused.weight][name].float(), plain_opt.state[plain.weight][name].float()
            # Rounded stochastically with other bits, from a gradient whose bf16 rounding (the
            # kernel's store against torch's cast) may differ by a step: within a few bf16 steps.
            torch.testing.assert_close(got, want, rtol=2**-5, atol=1e-30)
    assert fused_opt.state[fused.weight]["step"] == 3


def step_with_and_without_update_in_backward(fused, h, grad_out, sink=AdamGradSink, **sink_args):
    """One step of ``fused`` with its Adam step in its backward, and of a plain copy (backward, then
    ``CompactAdam.step`` on the gradient rounded to bf16, as the backward's update reads it);
    returns the fused layer's optimizer and the plain copy."""
    plain = copy.deepcopy(fused)
    fused_opt, plain_opt = CompactAdam(fused.parameters(), lr=0.1), CompactAdam(plain.parameters(), lr=0.1)
    fused.grad_weight_sink = sink(fused_opt, fused.weight, **sink_args)
    for layer, opt in ((fused, fused_opt), (plain, plain_opt)):
        layer(h.clone().requires_grad_()).backward(grad_out)
        if layer.weight.grad is not None:
            layer.weight.grad.copy_(layer.weight.grad.to(torch.bfloat16))
        opt.step()
    return fused_opt, plain


def test_several_label_chunks_update_every_slot_once():
    """An L2 this small cuts the labels into chunks for the by-input pass."""
    fused, h, grad_out = head_problem(4, "triton", n_labels=50)
    fused.plan = Plan(l2_bytes_default=2048)
    _, plain = step_with_and_without_update_in_backward(fused, h, grad_out)
    torch.testing.assert_close(fused.weight, plain.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("impl", "batch", "l2_bytes", "ranges"),
    [
        ("triton", 5, None, 0),  # the grad_W pass takes the step itself: no buffer
        ("triton", 100, None, 10),  # two batch blocks: grad_W range by range
        ("triton", 130, None, 1),  # one by-input launch: all labels fit one chunk
        ("triton", 130, 4096, 13),  # by-input launches, one 3-label chunk each
        ("triton", 600, 8192, 10),  # ... with grad_W summed over batch blocks in fp32
        ("triton", 0, None, 10),  # an empty batch still steps (momentum, weight decay)
        ("reference", 5, None, 13),  # 3 labels a chunk
    ],
)
def test_update_taken_range_by_range_equals_one_step(impl, batch, l2_bytes, ranges):
    """With ranges of a few labels the backward never holds the whole weight's gradient, and the
    weights end where a plain backward and CompactAdam.step put them."""
    held = []
    fused, h, grad_out = head_problem(batch, impl)
    fused.plan = Plan(sink_range_slots=4 * 6,  # 4 labels of fan-in 6
                      reference_chunk_elements=3 * 6 * max(batch, 1),  # 3 labels a chunk
                      **({} if l2_bytes is None else {"l2_bytes_default": l2_bytes}))
    fused_opt, plain = step_with_and_without_update_in_backward(fused, h, grad_out, RecordingSink, held=held)
    torch.testing.assert_close(fused.weight, plain.weight, rtol=1e-5, atol=1e-6)
    assert fused_opt.state[fused.weight]["step"] == 1
    # Each slot's gradient held once, a range at a time.
    assert len(held) == ranges and sum(held) == (fused.weight.numel() if ranges else 0)


@pytest.mark.parametrize("batch", [1, 40])
def test_step_inside_the_grad_weight_pass_equals_the_buffered_one(batch, monkeypatch):
    """Same gradient rounding, same Philox bits: the in-pass step and the buffered step agree
    exactly, weights and both moments."""
    from xmlsparse.ops import adam_kernels
    from xmlsparse.train import compact_adam

    # On CPU tensors the buffered step would take the torch form (other rounding bits): the kernel.
    monkeypatch.setattr(compact_adam, "apply_adam_", adam_kernels.adam_step_)
    results = []
    for sink in (AdamGradSink, BufferedSink):
        layer, h, grad_out = head_problem(batch, "triton")
        opt = CompactAdam(layer.parameters(), lr=0.1, weight_decay=0.01, decoupled=True, seed=5)
        layer.grad_weight_sink = sink(opt, layer.weight)
        for _ in range(2):
            layer(h.clone().requires_grad_()).backward(grad_out)
            opt.step()
        state = opt.state[layer.weight]
        results.append((layer.weight.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_evaluation_and_no_grad_leave_the_weights_alone():
    layer, h, _ = head_problem(3, "triton")
    opt = CompactAdam(layer.parameters(), lr=0.1)
    layer.grad_weight_sink = AdamGradSink(opt, layer.weight)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer(h)
    layer.eval()
    layer(h).sum().backward()
    assert torch.equal(layer.weight, before) and layer.weight.grad is not None


@pytest.mark.parametrize("name", ["squared-hinge", "bce"])
def test_loss_written_over_the_heads_logits_gives_the_plain_gradients(name):
    """The training step: the head writes [L, B] logits, the loss writes their gradient over them,
    the by-input backward reads it without a transposed copy."""
    from xmlsparse.train.losses import loss_fn

    layer, h, _ = head_problem(6, "triton")
    y_indices = torch.tensor([0, 5, 9, 3, 36, 2, 7, 11])
    y_ptr = torch.tensor([0, 2, 2, 4, 5, 7, 8])
    grads = []
    for consume in (True, False):
        layer.zero_grad()
        x = h.clone().requires_grad_()
        logits = layer(x)
        assert logits.stride() == (1, 6)
        loss_fn(name, impl="triton", consume_logits=consume)(logits, y_indices, y_ptr).backward()
        grads.append((x.grad, layer.weight.grad, layer.bias.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("impl", "batch", "ranges"), [("triton", 5, 3), ("triton", 130, 3), ("reference", 5, 3)])
def test_a_grouped_head_takes_its_step_in_backward_range_by_range(impl, batch, ranges):
    """Groups of 16 labels: grad_W goes to the sink in ranges of whole groups (two groups, 32
    labels, a range: 80 labels in 3 ranges) and the weights end where a plain backward and
    CompactAdam.step put them."""
    gen = torch.Generator().manual_seed(batch)
    fused = FixedFanInLinear(29, 80, 16, impl=impl, group_size=16, generator=gen)
    h, grad_out = torch.randn(batch, 29, generator=gen), torch.randn(batch, 80, generator=gen)
    fused.plan = Plan(sink_range_slots=32 * 16, reference_chunk_elements=32 * 16 * max(batch, 1))
    held = []
    fused_opt, plain = step_with_and_without_update_in_backward(fused, h, grad_out, RecordingSink, held=held)
    assert fused.weight.grad is None
    torch.testing.assert_close(fused.weight, plain.weight, rtol=1e-5, atol=1e-6)
    assert len(held) == ranges and sum(held) == fused.weight.numel()
