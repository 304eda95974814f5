"""Label implications read from the training labels, and top-k lists made consistent with them.

Label ``d`` implies label ``a`` when every training point of ``d`` (at least ``min_support`` of
them) also carries ``a``: a hierarchy's ancestor closure shows up this way (WordNet's hypernyms,
product categories, Wikipedia's parent categories), and on such data the probability of ``a``
can never be below that of ``d``. Scores that treat labels one by one break this where a rare
label is over-confident, so ``consistent_topk`` gives each implied label at least the score of
the labels that imply it, the max constraint of C-HMCNN (Giunchiglia & Lukasiewicz, NeurIPS 2020)
applied at prediction, and ranks an implied label first on ties (it is at least as likely).

Raising scores this way cannot bring a label from below the top k into it unless a label of the
top k implies it, so the step needs only each point's top-k list: without the B x L scores it
ranks as the whole score row would, except where labels outside the list tie with its last score
(the list's own choice among them stands, as in the plain top-k). On data without implications
the table is empty and the lists keep their labels, tied ones ordered by count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from xmlsparse.atomic import atomic_write
from xmlsparse.errors import XMLSparseError

# Labels of the co-occurrence product ``Y[:, block]^T Y`` computed at a time: its size grows with
# the block's labels times the labels they co-occur with, bounded by the block.
LABELS_PER_BLOCK = 4096


@dataclass(frozen=True, eq=False)
class LabelImplications:
    """For each label ``d`` the labels it implies, ``implied[indptr[d]:indptr[d + 1]]`` (CSR), and
    every label's training count (the tie-break: an implied label is at least as frequent)."""

    indptr: np.ndarray  # int64 [L + 1]
    implied: np.ndarray  # int64 [number of implications]
    counts: np.ndarray  # int64 [L]

    @property
    def n_labels(self) -> int:
        return len(self.counts)

    @classmethod
    def from_labels(cls, Y: sp.spmatrix, min_support: int, labels_per_block: int = LABELS_PER_BLOCK) -> LabelImplications:
        """The implications of the label matrix ``Y`` (points x labels) among labels with at least
        ``min_support`` points, in blocks of ``labels_per_block`` labels."""
        # Presence, whatever the stored values; a stored zero is no label (as label_frequencies has it).
        Y = sp.csr_matrix(Y, copy=True)
        Y.sum_duplicates()
        Y.eliminate_zeros()
        Y = sp.csr_matrix((np.ones(Y.nnz, dtype=np.int64), Y.indices, Y.indptr), shape=Y.shape)
        counts = np.asarray(Y.sum(axis=0)).ravel().astype(np.int64)
        by_label = Y.T.tocsr()  # labels x points
        rows, cols = [], []
        for start in range(0, Y.shape[1], labels_per_block):
            stop = min(start + labels_per_block, Y.shape[1])
            together = (by_label[start:stop] @ Y).tocoo()  # co-occurrence counts of the block's labels
            label = together.row + start
            keep = (together.data == counts[label]) & (together.col != label) & (counts[label] >= min_support)
            rows.append(label[keep])
            cols.append(together.col[keep])
        row, col = np.concatenate(rows), np.concatenate(cols)
        table = sp.csr_matrix((np.ones(len(row), dtype=np.int8), (row, col)), shape=(Y.shape[1], Y.shape[1]))
        table.sort_indices()
        return cls(table.indptr.astype(np.int64), table.indices.astype(np.int64), counts)

    def save(self, path: Path) -> None:
        with atomic_write(path) as handle:
            np.savez(handle, indptr=self.indptr, implied=self.implied, counts=self.counts)

    @classmethod
    def load(cls, path: Path, n_labels: int) -> LabelImplications:
        """Read what ``save`` wrote; an error names the file and what was expected."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                indptr, implied, counts = stored["indptr"], stored["implied"], stored["counts"]
        except (OSError, ValueError, KeyError) as error:
            raise XMLSparseError(f"{path}: cannot read the label implications ({error})") from None
        valid = (
            indptr.shape == (n_labels + 1,) and counts.shape == (n_labels,) and implied.ndim == 1
            and indptr[0] == 0 and indptr[-1] == len(implied) and np.all(np.diff(indptr) >= 0)
            and (len(implied) == 0 or (implied.min() >= 0 and implied.max() < n_labels))
        )
        if not valid:
            raise XMLSparseError(
                f"{path}: expected the implications of {n_labels} labels (indptr of {n_labels + 1}, "
                f"counts of {n_labels}, label ids below {n_labels}), found shapes {indptr.shape}, "
                f"{implied.shape}, {counts.shape}"
            )
        return cls(indptr.astype(np.int64), implied.astype(np.int64), counts.astype(np.int64))


def consistent_topk(
    implications: LabelImplications, scores: torch.Tensor, ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of each row after every label implied by one of the row's labels has been given
    at least that label's score; ties go to the more frequent label, then to the lower label id.
    ``scores`` and ``ids`` are a row's top-k lists (``[B, k0]``, k0 >= k, distinct ids per row)."""
    device = ids.device
    n_rows, width = ids.shape
    k = min(k, width)
    n_labels = implications.n_labels
    indptr = torch.as_tensor(implications.indptr, device=device)
    implied = torch.as_tensor(implications.implied, device=device)
    counts = torch.as_tensor(implications.counts, device=device)
    label = ids.reshape(-1).long()
    first = indptr[label]
    # Each listed label stands for itself (offset 0) and the labels it implies (offsets 1..n).
    spans = indptr[label + 1] - first + 1
    owner = torch.repeat_interleave(torch.arange(label.numel(), device=device), spans)
    offset = torch.arange(owner.numel(), device=device) - (torch.cumsum(spans, 0) - spans)[owner]
    from_table = implied[(first[owner] + offset - 1).clamp(min=0)] if implied.numel() else label[owner]
    candidate = torch.where(offset == 0, label[owner], from_table)
    row = torch.div(owner, width, rounding_mode="floor")
    keys, where = torch.unique(row * n_labels + candidate, return_inverse=True)
    best = torch.full(keys.shape, -torch.inf, device=device, dtype=scores.dtype)
    best.scatter_reduce_(0, where, scores.reshape(-1)[owner], reduce="amax")
    key_row = torch.div(keys, n_labels, rounding_mode="floor")
    key_label = keys - key_row * n_labels
    # Row, then score (descending), then count (descending); unique's order keeps ids ascending.
    order = torch.argsort(-counts[key_label], stable=True)
    order = order[torch.argsort(-best[order], stable=True)]
    order = order[torch.argsort(key_row[order], stable=True)]
    sorted_row = key_row[order]
    per_row = torch.bincount(sorted_row, minlength=n_rows)
    rank = torch.arange(order.numel(), device=device) - (torch.cumsum(per_row, 0) - per_row)[sorted_row]
    kept = order[rank < k]
    return best[kept].view(n_rows, k), key_label[kept].view(n_rows, k).to(ids.dtype)
