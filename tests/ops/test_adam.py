"""Adam with bf16 moments: the Triton kernel (interpreted on CPU) and the torch form, against an
exact float64 Adam step, and the stochastic rounding they share."""

import pytest
import torch

from xmlsparse.ops.adam import adam_step_reference_, round_to_bf16_reference
from xmlsparse.ops.adam_step import AdamStep
from xmlsparse.ops.adam_kernels import adam_step_


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 values around float32 ``x`` (truncation and one step up in magnitude)."""
    low = (x.view(torch.int32) & -65536).view(torch.float32)
    high = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return low, high


def exact_adam(w, g, m, v, step: AdamStep):
    w, g, m, v = (t.double() for t in (w, g, m, v))
    if step.decoupled:
        w = w * (1 - step.lr * step.weight_decay)
    else:
        g = g + step.weight_decay * w
    m = step.beta1 * m + (1 - step.beta1) * g
    v = step.beta2 * v + (1 - step.beta2) * g * g
    w = w - step.step_size * m / (v.sqrt() / step.bias_correction2_sqrt + step.eps)
    return w, m, v


def problem(n: int, seed: int, w_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen).to(w_dtype)
    g = torch.randn(n, generator=gen) * 10 ** torch.randint(-4, 2, (n,), generator=gen)
    m = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    v = (torch.rand(n, generator=gen) * 0.1).to(torch.bfloat16)
    return w, g, m, v


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("n", [1, 1023, 2500])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_one_step_matches_exact_adam(decoupled, n, path):
    w, g, m, v = problem(n, seed=n + decoupled)
    step = AdamStep(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=decoupled,
                    step=3, seed=1234)
    want_w, want_m, want_v = exact_adam(w, g, m.float(), v.float(), step)
    if path == "triton":
        adam_step_(w, g, m, v, step)
    else:
        adam_step_reference_(w, g, m, v, step, torch.Generator().manual_seed(5))
    # The weight is computed from the unrounded fp32 moments: float32 accuracy.
    torch.testing.assert_close(w.double(), want_w, rtol=1e-5, atol=1e-7)
    # Each moment lands on one of the two bf16 values around its exact float32 result.
    for got, want in ((m, want_m), (v, want_v)):
        low, high = bf16_neighbours(want.float())
        got = got.float()
        on_grid = (got == low) | (got == high) | (got == want.float())
        assert on_grid.all(), (got[~on_grid][:5], want[~on_grid][:5])


def test_a_slice_with_its_offset_rounds_as_the_whole_tensor_does():
    """The rounding bits are a function of the element's place in the whole parameter, so an
    update taken range by range (the head's backward) equals one over the whole tensor."""
    whole = problem(3000, seed=11)
    parts = [t.clone() for t in whole]
    step = AdamStep(1e-2, 0.9, 0.999, 1e-8, 0.01, True, 4, 77)
    adam_step_(*whole, step)
    for start, stop in ((0, 1100), (1100, 1101), (1101, 3000)):
        adam_step_(*(t[start:stop] for t in parts), step, offset=start)
    for got, want in zip(parts, whole):
        assert torch.equal(got, want)


def test_bf16_weights_are_rounded_stochastically():
    w, g, m, v = problem(777, seed=3, w_dtype=torch.bfloat16)
    step = AdamStep(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1, 99)
    want_w, _, _ = exact_adam(w, g, m.float(), v.float(), step)
    adam_step_(w, g, m, v, step)
    low, high = bf16_neighbours(want_w.float())
    assert ((w.float() == low) | (w.float() == high) | (w.float() == want_w.float())).all()


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_stochastic_rounding_is_unbiased(path):
    """A value a third of the way between two bf16 neighbours rounds up a third of the time."""
    low = torch.tensor(1.0)
    step = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((1 << 14,), float(low + step / 3))
    if path == "torch":
        rounded = round_to_bf16_reference(x, torch.Generator().manual_seed(0)).float()
    else:
        # Adam with lr 0 and beta1 0 stores m = g rounded: the kernel's rounding of x.
        w, m, v = torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bfloat16), torch.zeros_like(x, dtype=torch.bfloat16)
        adam_step_(w, x.clone(), m, v, AdamStep(0.0, 0.0, 0.999, 1e-8, 0.0, False, 1, 7))
        rounded = m.float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + step}
    assert abs(rounded.mean().item() - x[0].item()) < 4 * step / (3 * 128)


def test_second_moment_keeps_moving_where_round_to_nearest_stalls():
    """``v = 0.999 v + 0.001 g^2`` with g^2 = 1.5 v: each update is under half a bf16 step."""
    n, steps = 4096, 300
    v = torch.ones(n, dtype=torch.bfloat16)
    nearest = torch.ones(n, dtype=torch.bfloat16)
    exact = torch.ones(n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        v = round_to_bf16_reference(0.999 * v.float() + 0.001 * 1.5, gen)
        nearest = (0.999 * nearest.float() + 0.001 * 1.5).to(torch.bfloat16)
        exact = 0.999 * exact + 0.001 * 1.5
    assert nearest.float().eq(1.0).all()  # round to nearest never moves
    assert abs(v.double().mean().item() - exact[0].item()) < 2e-3


def test_bad_state_is_rejected():
    w, g, m, v = problem(8, seed=0)
    step = AdamStep(1e-3, 0.9, 0.999, 1e-8, 0.0, False, 1, 0)
    with pytest.raises(ValueError, match="moments must be"):
        adam_step_reference_(w, g, m.float(), v, step)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous, shaped"):
        adam_step_(w, g, m, v[:4], step)
