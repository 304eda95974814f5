import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmlsparse.errors import XMLSparseError
from xmlsparse.metrics import (
    FrequencyBucketMetrics,
    StreamingMetrics,
    bucket_names,
    frequency_buckets,
    inverse_propensity,
    label_frequencies,
    merge_topk,
    topk_from_scores,
    topk_from_sparse_scores,
    topk_values_and_indices,
)

KS = (1, 3, 5)


# ----------------------------------------------------------------------------- hand-computed cases


def test_propensity_hand_values():
    # A = 0.5, B = 3: (B + 1)^A = 2, so C = 2 (ln N - 1) and q = 1 + 2 (ln N - 1) / sqrt(N_l + 3).
    #   N_l = 1:  sqrt(4) = 2   -> q = ln N
    #   N_l = 13: sqrt(16) = 4  -> q = 1 + (ln N - 1) / 2
    #   N_l = 0:  sqrt(3)       -> q = 1 + 2 (ln N - 1) / sqrt(3)
    q = inverse_propensity(np.array([1, 13, 0]), n_train=100, a=0.5, b=3.0)
    ln_n = math.log(100)
    np.testing.assert_allclose(q, [ln_n, 1 + (ln_n - 1) / 2, 1 + 2 * (ln_n - 1) / math.sqrt(3)], rtol=1e-12)
    np.testing.assert_allclose(q[:2], [4.605170185988092, 2.802585092994046], rtol=1e-12)


def test_propensity_falls_with_frequency():
    q = inverse_propensity(np.arange(0, 1000, 7), n_train=15539, a=0.55, b=1.5)
    assert np.all(np.diff(q) < 0) and np.all(q > 1)


def test_label_frequencies_count_points_not_relevance():
    # Column 1 holds relevance 2.0 and an explicit zero: one point carries it.
    Y = sp.csr_matrix(
        (np.array([1.0, 2.0, 0.0, 1.0]), np.array([0, 1, 1, 3]), np.array([0, 2, 3, 4])), shape=(3, 5)
    )
    np.testing.assert_array_equal(label_frequencies(Y), [1, 1, 0, 1, 0])


def _hand_case():
    # Three points, six labels, inverse propensities chosen by hand.
    #   point 0: true {0, 2}          predicted [2, 1, 0]   hits [1, 0, 1]
    #   point 1: no labels            predicted [5, -1, -1] hits [0, 0, 0]
    #   point 2: true {1, 3, 4}       predicted [4, 3, -1]  hits [1, 1, 0]
    # (point 2's relevance values 2.0 and 0.5 count as plain relevant labels).
    truth = sp.csr_matrix(
        (np.array([1.0, 1.0, 2.0, 0.5, 1.0]), np.array([0, 2, 1, 3, 4]), np.array([0, 2, 2, 5])), shape=(3, 6)
    )
    topk = np.array([[2, 1, 0], [5, -1, -1], [4, 3, -1]])
    q = np.array([1.0, 2.0, 1.5, 3.0, 1.0, 1.0])
    return topk, truth, q


def test_hand_computed_metrics():
    topk, truth, q = _hand_case()
    m = StreamingMetrics(ks=(1, 3), inv_propensity=q)
    m.update(topk, truth)
    out = m.compute()
    c = 1 / math.log2(3)  # discount of rank 2; rank 1 -> 1, rank 3 -> 1/2
    expected = {
        # hits@1 = 1, 0, 1 ; hits@3 = 2, 0, 2
        "P@1": 2 / 3,
        "P@3": (2 / 3 + 0 + 2 / 3) / 3,
        # n_true = 2, 0, 3
        "R@1": (1 / 2 + 0 + 1 / 3) / 3,
        "R@3": (2 / 2 + 0 + 2 / 3) / 3,
        "nDCG@1": (1 + 0 + 1) / 3,
        # point 0: DCG = 1 + 1/2, ideal over min(3, 2) = 2 ranks = 1 + c
        # point 2: DCG = 1 + c,   ideal over 3 ranks = 1 + c + 1/2; point 1 adds 0 but counts
        "nDCG@3": (1.5 / (1 + c) + (1 + c) / (1.5 + c)) / 3,
        # top-1 hits carry q 1.5 (label 2) and 1.0 (label 4); best top-1 q: 1.5 and 3.0
        "PSP@1": (1.5 + 1.0) / (1.5 + 3.0),
        # hits' q: 1.5 + 1.0 and 1.0 + 3.0; best top-3 q: 1.5 + 1.0 and 3.0 + 2.0 + 1.0
        "PSP@3": (2.5 + 4.0) / (2.5 + 6.0),
        "PSnDCG@1": (1.5 / 1 + 1.0 / 1) / (1.5 / 1 + 3.0 / 1),
        # PSDCG: point 0 = 1.5 + 1.0/2, point 2 = 1.0 + 3.0 c; best: 1.5 + 1.0 c and 3.0 + 2.0 c + 1.0/2;
        # each divided by the point's ordinary ideal DCG (1 + c and 1.5 + c)
        "PSnDCG@3": (2.0 / (1 + c) + (1 + 3 * c) / (1.5 + c)) / ((1.5 + c) / (1 + c) + (3.5 + 2 * c) / (1.5 + c)),
    }
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert out["PSP@3"] == pytest.approx(13 / 17, abs=1e-12)
    assert m.n_points == 3


def test_hand_case_streamed_one_point_at_a_time_matches():
    topk, truth, q = _hand_case()
    whole = StreamingMetrics(ks=(1, 3), inv_propensity=q)
    whole.update(topk, truth)
    streamed = StreamingMetrics(ks=(1, 3), inv_propensity=q)
    for i in range(3):
        streamed.update(topk[i : i + 1], truth[i : i + 1])
    assert streamed.compute() == pytest.approx(whole.compute(), abs=1e-12)


def test_short_topk_is_padded_and_wide_topk_is_cut():
    # One point with true {0}, predicted [1, 0]: a hit at rank 2, so P@1 = 0, P@5 = 1/5, R@5 = 1 and
    # nDCG@5 = (1 / log2 3) / 1. Missing ranks are misses; columns past kmax = 5 are ignored.
    truth = sp.csr_matrix(np.array([[1.0, 0.0, 0.0]]))
    short = StreamingMetrics(ks=(1, 5))
    short.update(np.array([[1, 0]]), truth)
    wide = StreamingMetrics(ks=(1, 5))
    wide.update(np.array([[1, 0, 2, -1, -1, -1, -1]]), truth)
    for m in (short, wide):
        out = m.compute()
        assert out["P@1"] == 0.0 and out["P@5"] == pytest.approx(1 / 5)
        assert out["R@5"] == 1.0 and out["nDCG@5"] == pytest.approx(1 / math.log2(3))
    assert "PSP@1" not in short.compute()


def test_all_points_without_labels():
    m = StreamingMetrics(ks=(1,), inv_propensity=np.ones(4))
    m.update(np.array([[0], [3]]), sp.csr_matrix((2, 4)))
    assert m.compute() == {"P@1": 0.0, "nDCG@1": 0.0, "PSP@1": 0.0, "PSnDCG@1": 0.0, "R@1": 0.0}


def test_topk_ties_go_to_lower_id_and_pad_past_the_label_count():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(topk_from_scores(scores, 3), [[1, 3, 0], [0, 1, 2]])
    # 5 labels, k = 7: the last two slots are padding
    np.testing.assert_array_equal(topk_from_scores(scores, 7)[0], [1, 3, 0, 2, 4, -1, -1])
    t = topk_from_scores(torch.from_numpy(scores), 3)
    assert isinstance(t, torch.Tensor) and t.tolist() == [[1, 3, 0], [0, 1, 2]]
    # NaN ranks last
    np.testing.assert_array_equal(topk_from_scores(np.array([[np.nan, -1.0, np.inf]]), 3), [[2, 1, 0]])
    np.testing.assert_array_equal(topk_from_scores(np.array([[np.nan, 0.5, np.nan, 0.7]]), 2), [[3, 1]])


def test_sparse_topk_hand_case():
    # row 0: scores {4: 0.2, 3: 0.7, 1: 0.7, 0: 0.1} (unsorted ids, a tie); row 1 empty;
    # row 2: {0: NaN, 2: 0.0 (explicit, still a prediction)} -> NaN ranks last
    scores = sp.csr_matrix(
        (np.array([0.2, 0.7, 0.7, 0.1, np.nan, 0.0]), np.array([4, 3, 1, 0, 0, 2]), np.array([0, 4, 4, 6])),
        shape=(3, 5),
    )
    np.testing.assert_array_equal(topk_from_sparse_scores(scores, 3), [[1, 3, 4], [-1, -1, -1], [2, 0, -1]])


def test_merge_topk_hand_case():
    # block A holds labels 0..2, block B labels 3..4; ties between blocks go to the lower id
    vals_a, idx_a = np.array([[0.9, 0.5, -np.inf]]), np.array([[2, 0, -1]])
    vals_b, idx_b = np.array([[0.9, -np.inf, -np.inf]]), np.array([[3, 4, -1]])
    vals, idx = merge_topk(vals_a, idx_a, vals_b, idx_b, 4)
    np.testing.assert_array_equal(idx, [[2, 3, 0, 4]])  # a real -inf score beats padding
    np.testing.assert_array_equal(vals, [[0.9, 0.9, 0.5, -np.inf]])
    _, idx = merge_topk(vals_a, idx_a, vals_b, idx_b, 8)
    np.testing.assert_array_equal(idx, [[2, 3, 0, 4, -1, -1, -1, -1]])


def test_bad_inputs_raise():
    truth = sp.csr_matrix(np.eye(3))
    m = StreamingMetrics(ks=(1,))
    with pytest.raises(XMLSparseError, match="shape"):
        m.update(np.zeros((2, 1), dtype=np.int64), truth)
    with pytest.raises(XMLSparseError, match="label ids"):
        m.update(np.array([[0], [3], [1]]), truth)
    with pytest.raises(XMLSparseError, match="cover 2 labels"):
        StreamingMetrics(ks=(1,), inv_propensity=np.ones(2)).update(np.zeros((3, 1), dtype=np.int64), truth)
    with pytest.raises(XMLSparseError, match="no points"):
        m.compute()
    with pytest.raises(XMLSparseError, match="positive"):
        StreamingMetrics(ks=(0, 1))


# ----------------------------------------------------------------------------- brute force


def brute_topk(scores: np.ndarray, k: int) -> np.ndarray:
    out = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for i, row in enumerate(scores):
        ranked = sorted(range(len(row)), key=lambda label: (-row[label], label))[:k]
        out[i, : len(ranked)] = ranked
    return out


def brute_metrics(topk: np.ndarray, relevant: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """Straight from the definitions, one point at a time, on a dense boolean truth matrix."""
    out = {}
    n = relevant.shape[0]
    for k in KS:
        p = ndcg = rec = psp_num = psp_den = psn_num = psn_den = 0.0
        for i in range(n):
            true = [label for label in range(relevant.shape[1]) if relevant[i, label]]
            preds = [label for label in topk[i, :k] if label >= 0] + [-1] * k
            hits = [1.0 if preds[j] in true else 0.0 for j in range(k)]
            gains_q = [q[preds[j]] if hits[j] else 0.0 for j in range(k)]
            best_q = sorted((q[label] for label in true), reverse=True)[:k]
            p += sum(hits) / k
            psp_num += sum(gains_q) / k
            psp_den += sum(best_q) / k
            if true:
                ideal = sum(1 / math.log2(j + 2) for j in range(min(k, len(true))))
                ndcg += sum(hits[j] / math.log2(j + 2) for j in range(k)) / ideal
                rec += sum(hits) / len(true)
                psn_num += sum(gains_q[j] / math.log2(j + 2) for j in range(k)) / ideal
                psn_den += sum(best_q[j] / math.log2(j + 2) for j in range(len(best_q))) / ideal
        out[f"P@{k}"] = p / n
        out[f"nDCG@{k}"] = ndcg / n
        out[f"R@{k}"] = rec / n
        out[f"PSP@{k}"] = psp_num / psp_den if psp_den else 0.0
        out[f"PSnDCG@{k}"] = psn_num / psn_den if psn_den else 0.0
    return out


def random_truth(rng: np.random.Generator, n: int, n_labels: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """CSR truth with relevance values, explicit zeros (not relevant) and empty rows; and its dense mask."""
    stored = rng.random((n, n_labels)) < min(0.5, 4 / n_labels)
    stored[rng.random(n) < 0.2] = False
    values = rng.choice([0.0, 0.5, 1.0, 2.0], size=(n, n_labels), p=[0.2, 0.2, 0.4, 0.2]) * stored
    rows, cols = np.nonzero(stored)
    truth = sp.csr_matrix((values[rows, cols], (rows, cols)), shape=(n, n_labels))
    assert truth.nnz == stored.sum()  # explicit zeros kept
    return truth, values != 0


def chunked_topk(scores: np.ndarray, k: int, block: int) -> np.ndarray:
    vals, idx = topk_values_and_indices(scores[:, :block], k)
    for start in range(block, scores.shape[1], block):
        v, i = topk_values_and_indices(scores[:, start : start + block], k, label_offset=start)
        vals, idx = merge_topk(vals, idx, v, i, k)
    return idx


@pytest.mark.parametrize("n", [1, 7, 50, 200])
@pytest.mark.parametrize("n_labels", [3, 10, 100, 1000])
def test_streaming_matches_brute_force(n, n_labels):
    rng = np.random.default_rng(1000 * n + n_labels)
    # coarse scores so that ties are common
    scores = np.round(rng.random((n, n_labels)), 1 if n_labels <= 100 else 2).astype(np.float32)
    truth, relevant = random_truth(rng, n, n_labels)
    train = sp.csr_matrix(rng.random((300, n_labels)) < 0.05)
    q = inverse_propensity(label_frequencies(train), 300, 0.55, 1.5)

    kmax = 7  # wider than the largest k evaluated
    expected_topk = brute_topk(scores, kmax)
    np.testing.assert_array_equal(topk_from_scores(scores, kmax), expected_topk)
    np.testing.assert_array_equal(topk_from_scores(torch.from_numpy(scores), kmax).numpy(), expected_topk)
    np.testing.assert_array_equal(chunked_topk(scores, kmax, block=max(1, n_labels // 3)), expected_topk)

    m = StreamingMetrics(ks=KS, inv_propensity=q)
    sizes = rng.integers(1, max(2, n // 3), size=n)
    bounds = np.minimum(np.concatenate([[0], np.cumsum(sizes)]), n)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            m.update(expected_topk[start:end], truth[start:end])
    got = m.compute()
    want = brute_metrics(expected_topk, relevant, q)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert m.n_points == n


@pytest.mark.parametrize("n_labels", [3, 50, 1000])
def test_sparse_topk_matches_brute_force(n_labels):
    rng = np.random.default_rng(n_labels)
    n, k = 60, 5
    stored = rng.random((n, n_labels)) < min(0.6, 8 / n_labels)
    stored[::7] = False
    dense = np.where(stored, np.round(rng.standard_normal((n, n_labels)), 1), -np.inf)
    rows, cols = np.nonzero(stored)
    scores = sp.csr_matrix((dense[rows, cols], (rows, cols)), shape=(n, n_labels))
    want = brute_topk(dense, k)
    want[np.take_along_axis(dense, np.maximum(want, 0), axis=1) == -np.inf] = -1  # unstored -> padding
    np.testing.assert_array_equal(topk_from_sparse_scores(scores, k), want)


def test_bf16_scores_rank_as_their_float32_values():
    """Evaluation ranks bf16 logit blocks as they are (no float32 copy); bf16's many ties must
    still go to the lower label id."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(9, 500, generator=gen).to(torch.bfloat16)
    scores[:, 40:90] = 2.5  # a tie straddling the k-th place in every row
    vals, ids = topk_values_and_indices(scores, 5, label_offset=7)
    want_vals, want_ids = topk_values_and_indices(scores.float(), 5, label_offset=7)
    assert vals.dtype == torch.bfloat16
    assert torch.equal(ids, want_ids) and torch.equal(vals.float(), want_vals)


# ----------------------------------------------------------------------------- by label frequency


def test_frequency_buckets_hand_case():
    # Frequencies of 8 labels, 16 occurrences, cut in 3 parts at 16/3 and 32/3. Laid out most
    # frequent first, label 0 covers [0, 6) (midpoint 3: head), labels 2 and 3 together [6, 12)
    # (midpoint 9: torso), labels 4..7 [12, 16) (midpoint 14: tail); label 1 is never seen: tail.
    freq = np.array([6, 0, 3, 3, 1, 1, 1, 1])
    np.testing.assert_array_equal(frequency_buckets(freq, 3), [0, 2, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(frequency_buckets(freq, 1), np.zeros(8))
    # Two parts cut at 8: midpoints 3 -> head, 9 and 14 -> tail.
    np.testing.assert_array_equal(frequency_buckets(freq, 2), [0, 1, 1, 1, 1, 1, 1, 1])
    # Four labels of one frequency cover [0, 4) together; their midpoint 2 lies exactly on the cut
    # of two parts, which belongs to the later part (the head stays empty).
    np.testing.assert_array_equal(frequency_buckets(np.array([1, 1, 1, 1]), 2), [1, 1, 1, 1])
    # No training occurrences at all: every label is in the tail.
    np.testing.assert_array_equal(frequency_buckets(np.zeros(4, dtype=np.int64), 3), [2, 2, 2, 2])
    assert bucket_names(1) == ["all"] and bucket_names(2) == ["head", "tail"]
    assert bucket_names(3) == ["head", "torso", "tail"]
    assert bucket_names(4) == ["head", "torso-1", "torso-2", "tail"]


def test_frequency_bucket_metrics_hand_case():
    topk, truth, q = _hand_case()
    # 12 occurrences: label 0 (5) covers [0, 5) -> head; label 2 (3) [5, 8), midpoint 6.5 -> torso;
    # label 5 (2) [8, 10) and labels 3, 4 (1 each) [10, 12) -> tail; label 1 (never seen) -> tail.
    freq = np.array([5, 0, 3, 1, 1, 2])
    m = FrequencyBucketMetrics(freq, 3, ks=(1, 3), inv_propensity=q)
    m.update(topk, truth)
    head, torso, tail = m.compute()
    # Hits: point 0 hits label 2 (torso) at rank 1 and label 0 (head) at rank 3; point 2 hits labels
    # 4 and 3 (tail) at ranks 1 and 2. Best q: top 1 -> 1.5 + 3 = 4.5; top 3 -> (2.5 + 6) / 3.
    assert head == pytest.approx({
        "bucket": "head", "labels": 1, "freq_min": 5, "freq_max": 5, "train_share": 5 / 12, "points": 1,
        "P@1": 0.0, "P@3": 1 / 9, "PSP@1": 0.0, "PSP@3": 1 / 8.5, "R@1": 0.0, "R@3": 1.0,
    })
    assert torso == pytest.approx({
        "bucket": "torso", "labels": 1, "freq_min": 3, "freq_max": 3, "train_share": 3 / 12, "points": 1,
        "P@1": 1 / 3, "P@3": 1 / 9, "PSP@1": 1.5 / 4.5, "PSP@3": 1.5 / 8.5, "R@1": 1.0, "R@3": 1.0,
    })
    assert tail == pytest.approx({
        "bucket": "tail", "labels": 4, "freq_min": 0, "freq_max": 2, "train_share": 4 / 12, "points": 1,
        "P@1": 1 / 3, "P@3": 2 / 9, "PSP@1": 1 / 4.5, "PSP@3": 4 / 8.5, "R@1": 1 / 3, "R@3": 2 / 3,
    })


def test_frequency_bucket_metrics_empty_bucket_and_no_propensities():
    # One frequency holds all the occurrences: its midpoint (1/2) puts it in the torso of three
    # parts, the head stays empty; R@k is undefined where no point has a true label.
    m = FrequencyBucketMetrics(np.array([4, 4, 0]), 3, ks=(1,))
    m.update(np.array([[0], [2]]), sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])))
    head, torso, tail = m.compute()
    assert head == {"bucket": "head", "labels": 0, "freq_min": None, "freq_max": None, "train_share": 0.0,
                    "points": 0, "P@1": 0.0, "R@1": None}
    assert torso["labels"] == 2 and torso["P@1"] == 0.5 and torso["R@1"] == 1.0
    assert tail["labels"] == 1 and tail["P@1"] == 0.0 and tail["R@1"] is None and "PSP@1" not in tail


def test_frequency_bucket_bad_inputs_raise():
    truth = sp.csr_matrix(np.eye(3))
    with pytest.raises(XMLSparseError, match="label frequencies cover 2 labels"):
        FrequencyBucketMetrics(np.ones(2, dtype=np.int64)).update(np.zeros((3, 1), dtype=np.int64), truth)
    with pytest.raises(XMLSparseError, match="positive number of buckets"):
        FrequencyBucketMetrics(np.ones(3, dtype=np.int64), 0)
    for freq in (np.array([1, -1, 2]), np.array([1.0, 2.0]), np.ones((2, 2), dtype=np.int64)):
        with pytest.raises(XMLSparseError, match="non-negative integer counts"):
            frequency_buckets(freq, 3)
    m = FrequencyBucketMetrics(np.ones(3, dtype=np.int64))
    with pytest.raises(XMLSparseError, match="label ids"):
        m.update(np.array([[0], [3], [1]]), truth)
    with pytest.raises(XMLSparseError, match="no points"):
        m.compute()


def brute_buckets(freq: np.ndarray, n_buckets: int) -> np.ndarray:
    """Each label's bucket straight from the rule: the part of [0, total) holding the midpoint of
    the occurrences of all labels of its frequency, laid out most frequent first."""
    total = freq.sum()
    out = np.full(freq.shape[0], n_buckets - 1)
    for label, f in enumerate(freq):
        if f == 0 or total == 0:
            continue
        above = freq[freq > f].sum()
        midpoint = above + freq[freq == f].sum() / 2
        out[label] = min(n_buckets - 1, math.floor(n_buckets * midpoint / total))
    return out


def brute_bucket_metrics(
    topk: np.ndarray, relevant: np.ndarray, q: np.ndarray, bucket: np.ndarray, n_buckets: int
) -> list[dict[str, float | None]]:
    """Per-bucket P@k, PSP@k and R@k from the definitions, one point at a time, in float64."""
    n = relevant.shape[0]
    rows = []
    for b in range(n_buckets):
        row: dict[str, float | None] = {}
        for k in KS:
            p = psp = psp_den = rec = 0.0
            with_labels = 0
            for i in range(n):
                true = [label for label in range(relevant.shape[1]) if relevant[i, label]]
                preds = [label for label in topk[i, :k] if label >= 0]
                hits_b = [label for label in preds if label in true and bucket[label] == b]
                true_b = [label for label in true if bucket[label] == b]
                p += len(hits_b) / k
                psp += sum(q[label] for label in hits_b) / k
                psp_den += sum(sorted((q[label] for label in true), reverse=True)[:k]) / k
                if true_b:
                    with_labels += 1
                    rec += len(hits_b) / len(true_b)
            row[f"P@{k}"] = p / n
            row[f"PSP@{k}"] = psp / psp_den if psp_den else 0.0
            row[f"R@{k}"] = rec / with_labels if with_labels else None
        rows.append(row)
    return rows


@pytest.mark.parametrize("n", [1, 9, 120])
@pytest.mark.parametrize("n_labels", [3, 40, 400])
@pytest.mark.parametrize("n_buckets", [1, 3, 5])
def test_frequency_bucket_metrics_match_brute_force_and_sum_to_overall(n, n_labels, n_buckets):
    rng = np.random.default_rng(100_000 * n_buckets + 1000 * n + n_labels)
    train = sp.csr_matrix(rng.random((300, n_labels)) < rng.power(0.3, n_labels))  # skewed frequencies
    truth, relevant = random_truth(rng, n, n_labels)
    # The test set's most common label was never seen in training; it is predicted first wherever
    # it is relevant (a hit) and for every third point (a miss where it is not).
    unseen = int(np.argmax(relevant.sum(axis=0)))
    freq = label_frequencies(train)
    freq[unseen] = 0
    q = inverse_propensity(freq, 300, 0.55, 1.5)
    scores = np.round(rng.random((n, n_labels)), 1)
    scores[relevant[:, unseen] | (np.arange(n) % 3 == 0), unseen] = 2.0
    topk = brute_topk(scores, 6)  # wider than the largest k; 3 labels leave padding slots
    topk[rng.random(n) < 0.3, 3:] = -1  # points with fewer predictions than k

    bucket = frequency_buckets(freq, n_buckets)
    np.testing.assert_array_equal(bucket, brute_buckets(freq, n_buckets))
    assert bucket[unseen] == n_buckets - 1

    by_freq = FrequencyBucketMetrics(freq, n_buckets, ks=KS, inv_propensity=q)
    overall = StreamingMetrics(ks=KS, inv_propensity=q)
    bounds = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, size=3)]))
    for start, end in zip(bounds[:-1], bounds[1:]):
        by_freq.update(topk[start:end], truth[start:end])
        overall.update(topk[start:end], truth[start:end])
    rows, whole = by_freq.compute(), overall.compute()
    want = brute_bucket_metrics(topk, relevant, q, bucket, n_buckets)

    assert [row["bucket"] for row in rows] == bucket_names(n_buckets)
    assert sum(row["labels"] for row in rows) == n_labels
    assert sum(row["train_share"] for row in rows) == pytest.approx(1.0)
    for b, (row, expected) in enumerate(zip(rows, want)):
        in_bucket = freq[bucket == b]
        assert row["labels"] == in_bucket.size
        if in_bucket.size:
            assert (row["freq_min"], row["freq_max"]) == (in_bucket.min(), in_bucket.max())
        assert row["points"] == sum(relevant[i, bucket == b].any() for i in range(n))
        for key, value in expected.items():
            assert row[key] == (None if value is None else pytest.approx(value, abs=1e-12)), (b, key)
    for k in KS:
        assert sum(row[f"P@{k}"] for row in rows) == pytest.approx(whole[f"P@{k}"], abs=1e-12)
        assert sum(row[f"PSP@{k}"] for row in rows) == pytest.approx(whole[f"PSP@{k}"], abs=1e-12)
