"""The L*K-sized builds run piece by piece: the by-input index and the rewiring selection give
exactly what one pass over all slots gives, whatever the piece size."""

import weakref

import pytest
import torch

from xmlsparse.config import RewireConfig
from xmlsparse.train import rewiring
from xmlsparse.train.rewiring import Rewirer

from xmlsparse.ops.fixed_fanin import by_input  # noqa: E402
from xmlsparse.ops.fixed_fanin.by_input import ByInputCache, build_by_input_index  # noqa: E402


def reference_transposed(indices: torch.Tensor, n_inputs: int, chunk_labels: int):
    n_labels, fan_in = indices.shape
    chunk_labels = max(1, min(chunk_labels, n_labels))
    n_chunks = -(-n_labels // chunk_labels)
    n_slots = n_labels * fan_in
    chunk = torch.arange(n_slots, dtype=torch.int64) // max(chunk_labels * fan_in, 1)
    key = chunk * n_inputs + indices.reshape(-1).long()
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=n_chunks * n_inputs)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    return chunk_labels, n_chunks, order, offsets


def random_indices(n_labels, fan_in, n_inputs, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_inputs, (n_labels, fan_in), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("piece", [1, 7, 64, 1 << 24])
@pytest.mark.parametrize(
    "n_labels, fan_in, n_inputs, chunk_labels",
    [
        (37, 5, 11, 4),  # chunk_labels does not divide L: a partial last chunk
        (50, 3, 2, 7),  # few inputs, many ties
        (23, 4, 5000, 3),  # n_inputs far above the slots
        (40, 1, 9, 6),  # K = 1
        (1, 6, 4, 5),  # L = 1
        (29, 4, 13, 1),  # one label a chunk
        (19, 3, 7, 100),  # one chunk
        (12, 0, 5, 5),  # K = 0
    ],
)
def test_by_input_index_matches_one_stable_sort(piece, n_labels, fan_in, n_inputs, chunk_labels):
    indices = random_indices(n_labels, fan_in, n_inputs, seed=n_labels * 31 + fan_in)
    before = indices.clone()
    index = build_by_input_index(indices, n_inputs, chunk_labels, build_slots=piece)
    chunk_labels_ref, n_chunks, order, offsets = reference_transposed(indices, n_inputs, chunk_labels)
    assert torch.equal(indices, before)  # the keys are built in a copy
    assert (index.chunk_labels, index.n_chunks, index.n_inputs) == (chunk_labels_ref, n_chunks, n_inputs)
    assert index.slots.dtype == torch.int32 and index.offsets.dtype == torch.int32
    assert torch.equal(index.slots.long(), order)
    assert torch.equal(index.offsets.long(), offsets)


def test_by_input_index_pieces_hold_several_chunks_and_single_large_chunks():
    # Piece of 64 slots: chunks of 3 labels x 4 slots = 12 slots, 64 // 12 = 5 chunks a piece unless
    # the counts (chunks x n_inputs) cap it; and chunks larger than a piece stay whole.
    indices = random_indices(101, 4, 6, seed=5)
    for piece in (64, 10, 3):
        for chunk_labels in (3, 50):
            index = build_by_input_index(indices, 6, chunk_labels, build_slots=piece)
            _, _, order, offsets = reference_transposed(indices, 6, chunk_labels)
            assert torch.equal(index.slots.long(), order) and torch.equal(index.offsets.long(), offsets)


def test_by_input_index_empty_layer():
    index = build_by_input_index(torch.zeros(0, 3, dtype=torch.int32), 4, 8)
    assert index.n_chunks == 0 and index.slots.numel() == 0 and torch.equal(index.offsets, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("piece", [5, 1 << 24])
def test_by_input_index_rejects_out_of_range(piece):
    indices = random_indices(20, 3, 5, seed=1)
    with pytest.raises(ValueError, match="indices must lie in"):
        build_by_input_index(indices + 5, 5, chunk_labels=4, build_slots=piece)
    bad = indices.clone()
    bad[17, 2] = -1
    with pytest.raises(ValueError, match="indices must lie in"):
        build_by_input_index(bad, 5, chunk_labels=4, build_slots=piece)


# ---------------------------------------------------------------------------------------------


def old_select_pruned(fraction, weight, generator):
    """The selection before it ran in pieces: one float32 copy and kthvalue over all slots."""
    magnitude = weight.detach().abs().float().flatten()
    n_prune = round(fraction * magnitude.numel())
    kth = magnitude.kthvalue(n_prune).values
    pruned = magnitude < kth
    missing = n_prune - int(pruned.sum())
    if missing > 0:
        ties = (magnitude == kth).nonzero().squeeze(1)
        pick = torch.randperm(ties.numel(), generator=generator, device=ties.device)[:missing]
        pruned[ties[pick]] = True
    return pruned.view_as(weight)


def select(fraction, weight, seed=0, threshold=None, piece=rewiring.SELECT_CHUNK_SLOTS):
    # A threshold, when given, replaces the fraction (select(None, ..., threshold=t) prunes by it).
    rewirer = Rewirer(RewireConfig(interval=1, fraction=fraction, threshold=threshold), total_steps=10, seed=0,
                      select_chunk_slots=piece)
    return rewirer._select_pruned(weight, threshold, torch.Generator().manual_seed(seed))


def check_selection(weight, fraction, mask):
    magnitude = weight.detach().abs().float().flatten()
    n_prune = round(fraction * magnitude.numel())
    flat = mask.flatten()
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert int(flat.sum()) == n_prune
    if n_prune:
        kth = magnitude.kthvalue(n_prune).values
        assert bool(flat[magnitude < kth].all())  # every slot strictly below the cut is pruned
        assert not bool(flat[magnitude > kth].any())  # none above it


def weights_with_ties(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[torch.rand(shape, generator=gen) < 0.3] = 0.0  # many zeros (regrown slots)
    weight[torch.rand(shape, generator=gen) < 0.1] = -0.25  # a tie away from zero, negative sign
    weight[torch.rand(shape, generator=gen) < 0.05] = -0.0
    return weight.to(dtype)


@pytest.mark.parametrize("piece", [1, 13, 256, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.35, 0.5, 1.0])
def test_selection_prunes_exactly_the_smallest(piece, dtype, fraction):
    weight = weights_with_ties((61, 9), seed=int(fraction * 100) + piece, dtype=dtype)
    mask = select(fraction, weight, seed=3, piece=piece)
    check_selection(weight, fraction, mask)
    magnitude = weight.abs().float().flatten()
    if int((magnitude == magnitude.kthvalue(round(fraction * weight.numel())).values).sum()) <= piece:
        # Ties few enough to list: the same slots, tie choice included, as the single-pass
        # selection with the same generator.
        assert torch.equal(mask, old_select_pruned(fraction, weight, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("piece", [3, 16, 100])
def test_selection_many_ties_by_random_keys(piece):
    # More ties than a piece: the random-key path. Exact count, deterministic per seed, uniform-ish.
    weight = torch.zeros(40, 10)
    weight[::3] = torch.linspace(0.1, 1.0, 10)
    mask = select(0.5, weight, seed=1, piece=piece)
    check_selection(weight, 0.5, mask)
    assert torch.equal(mask, select(0.5, weight, seed=1, piece=piece))
    assert not torch.equal(mask, select(0.5, weight, seed=2, piece=piece))
    if piece < 16:
        return
    hits = sum(select(0.5, weight, seed=s, piece=piece).float() for s in range(40))
    zeros = weight == 0
    assert float(hits[zeros].min()) > 5 and float(hits[zeros].max()) < 40  # every tie can be drawn, none always


def test_selection_all_tied_and_all_pruned():
    piece = 7
    weight = torch.full((30, 5), 0.5)
    for fraction in (0.1, 0.5, 1.0):
        check_selection(weight, fraction, select(fraction, weight, seed=4, piece=piece))
    weight[:, 0] = 0.0
    check_selection(weight, 0.2, select(0.2, weight, piece=piece))  # every zero: missing == number of ties


def test_selection_random_key_collisions_taken_in_slot_order(monkeypatch):
    # Force equal random keys: every tie draws the same key, so the cut falls among equal keys.
    piece = 8
    real_randint = torch.randint

    def constant_keys(low, high, size, **kwargs):
        if kwargs.get("dtype") == torch.int32:
            return torch.full(size, 12345, dtype=torch.int32)
        return real_randint(low, high, size, **kwargs)

    monkeypatch.setattr(torch, "randint", constant_keys)
    weight = torch.zeros(10, 5)
    weight[:, 4] = 1.0
    mask = select(0.5, weight, piece=piece)
    check_selection(weight, 0.5, mask)
    assert torch.equal(mask.flatten().nonzero().squeeze(1), (weight.flatten() == 0).nonzero().squeeze(1)[:25])


@pytest.mark.parametrize("piece", [3, 1 << 22])
def test_threshold_mode_in_pieces(piece):
    for dtype in (torch.float32, torch.bfloat16):
        weight = weights_with_ties((17, 6), seed=9, dtype=dtype)
        mask = select(None, weight, threshold=0.3, piece=piece)
        assert torch.equal(mask, weight.abs().float() < 0.3)


def test_selection_under_no_grad_leaves_weight_alone():
    piece = 10
    weight = torch.nn.Parameter(weights_with_ties((20, 4), seed=2))
    before = weight.detach().clone()
    with torch.no_grad():
        mask = select(0.3, weight, piece=piece)
    assert not mask.requires_grad and torch.equal(weight.detach(), before)
    check_selection(weight, 0.3, mask)


def test_a_replaced_by_input_index_is_freed_before_its_replacement_is_built(monkeypatch):
    """A batch that needs smaller label chunks rebuilds the kept index; the old one (1 GB at
    amazon-3m shape) must not live beside the new one while it is built."""
    indices = random_indices(40, 4, 13, seed=3)
    cache = ByInputCache()
    old_slots = weakref.ref(cache.get(indices, 13, 32).slots)
    build = by_input.build_by_input_index
    old_alive_during_build = []

    def watched_build(*args):
        old_alive_during_build.append(old_slots() is not None)
        return build(*args)

    monkeypatch.setattr(by_input, "build_by_input_index", watched_build)
    rebuilt = cache.get(indices, 13, 8)
    assert old_alive_during_build == [False]
    assert cache.get(indices, 13, 8) is rebuilt  # kept again


@pytest.mark.parametrize("change", ["eval", "redraw", "load_state_dict", "reset"])
def test_the_layer_drops_its_by_input_index_when_it_is_not_needed_or_stale(change):
    pytest.importorskip("triton")
    from xmlsparse.nn.sparse_linear import FixedFanInLinear

    layer = FixedFanInLinear(17, 30, 4, impl="triton", generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 17)
    layer(h.clone().requires_grad_()).sum().backward()
    assert layer.by_input.nbytes > 0
    if change == "eval":
        layer.eval()
    elif change == "redraw":
        layer.redraw_connections(torch.rand(30, 4, generator=torch.Generator().manual_seed(1)) < 0.5)
    elif change == "load_state_dict":
        layer.load_state_dict(FixedFanInLinear(17, 30, 4, impl="triton").state_dict())
    else:
        layer.reset_parameters()
    assert layer.by_input.nbytes == 0
    layer.train()
    x = h.clone().requires_grad_()
    layer(x).sum().backward()
    assert layer.by_input.nbytes > 0 and x.grad is not None
    want = torch.zeros(3, 17).index_add_(1, layer.indices.reshape(-1).long(),
                                         layer.weight.detach().reshape(-1).expand(3, -1).contiguous())
    torch.testing.assert_close(x.grad, want)
