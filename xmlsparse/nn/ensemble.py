"""Several trained models of the same labels scored as one: the mean of their logits."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from xmlsparse.data.batches import Batch
from xmlsparse.nn.model import XMCModel


class LogitEnsemble(nn.Module):
    """``logits = mean(member(batch) for member in members)``, for scoring only.

    The mean of logits rather than of probabilities: members trained with the softmax loss have
    logits defined up to a constant per point, which shifts a point's mean and leaves its ranking
    as it is, while their probabilities are on a scale the per-label sigmoid's are not."""

    def __init__(self, members: Sequence[XMCModel]) -> None:
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        n_labels = {member.n_labels for member in members}
        if len(n_labels) != 1:
            raise ValueError(f"the members score different numbers of labels: {sorted(n_labels)}")
        self.members = nn.ModuleList(members)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean logits ``[B, L]`` in float32."""
        total = None
        for member in self.members:
            logits = member(batch).float()
            total = logits if total is None else total.add_(logits)
        return total / len(self.members)

    def label_blocks(self, batch: Batch, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, mean logits of labels start .. start + block)``: the members' label blocks,
        which cover the same labels in the same order, averaged one block at a time (float32)."""
        streams = [member.label_blocks(batch, block) for member in self.members]
        for parts in zip(*streams):
            start, total = parts[0][0], parts[0][1].float()
            for _, logits in parts[1:]:
                total += logits
            yield start, total / len(parts)
