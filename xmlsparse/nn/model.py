"""The classifier: encoder -> optional dense intermediate layer -> output head, built from the
``model:`` section of the config (:class:`xmlsparse.config.ModelConfig`), whose defaults, choices
and ranges ``xmlsparse.config`` holds and checks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from xmlsparse.config import CHOICES, EncoderConfig, HeadConfig, ModelConfig, check_model_fits
from xmlsparse.data.batches import Batch
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.encoders import BowEncoder, DenseEncoder, make_activation
from xmlsparse.nn.heads import HeadTailLinear, dense_label_count
from xmlsparse.nn.sparse_linear import FixedFanInLinear

PARTS = ("encoder", "intermediate", "head")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class XMCModel(nn.Module):
    """``logits = head(intermediate(encoder(batch)))``; ``intermediate`` may be None."""

    def __init__(self, encoder: nn.Module, intermediate: nn.Module | None, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.intermediate = intermediate
        self.head = head

    @property
    def n_labels(self) -> int:
        """The number of labels the head scores."""
        return (self.head[-1] if isinstance(self.head, nn.Sequential) else self.head).out_features

    @property
    def sparse_head(self) -> FixedFanInLinear | None:
        """The fixed fan-in layer that scores labels (the head, or the tail of a head–tail split),
        which rewiring and the optimizer's gradient sink work on; None for dense heads."""
        head = self.head
        if isinstance(head, HeadTailLinear):
            return head.tail
        return head if isinstance(head, FixedFanInLinear) else None

    def features(self, batch: Batch) -> torch.Tensor:
        """The head's input ``h [B, d]``, for callers that run the head themselves."""
        h = self.encoder(batch)
        return h if self.intermediate is None else self.intermediate(h)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B, L]``."""
        return self.head(self.features(batch))

    def label_blocks(self, batch: Batch, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, logits[:, start:start + block])`` over the labels, so that scoring a batch
        never holds all ``B x L`` logits at once; the head's input is computed once."""
        return self.head_blocks(self.features(batch), block)

    def head_blocks(self, h: torch.Tensor, block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``label_blocks`` of the head's input ``h``, for callers that compute (or gather) it themselves."""
        head = self.head
        if isinstance(head, nn.Sequential):  # bottleneck: the low-rank part once, then label slices
            h, head = head[:-1](h), head[-1]
        # Under autocast, the bf16 copies of the layers below (the intermediate weight: 96 MiB at
        # 65,536 x 768) are cached until the autocast region ends; no label block needs them.
        torch.clear_autocast_cache()
        if isinstance(head, HeadTailLinear):
            yield from head.label_blocks(h, block)
            return
        n_labels = head.out_features
        group = getattr(head, "group_size", 1)
        block = max(group, block // group * group)  # a grouped head's blocks begin at a group
        for start in range(0, n_labels, block):
            stop = min(start + block, n_labels)
            if isinstance(head, FixedFanInLinear):
                yield start, head.logits(h, start, stop)
            else:
                yield start, F.linear(h, head.weight[start:stop], None if head.bias is None else head.bias[start:stop])

    def parts(self) -> dict[str, nn.Module]:
        """The model's parts by name (``intermediate`` left out when there is none)."""
        found = {"encoder": self.encoder, "intermediate": self.intermediate, "head": self.head}
        return {name: module for name, module in found.items() if module is not None}

    def param_groups(self, lrs: Mapping[str, float]) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per part, each with its own learning rate from
        ``lrs`` (keys ``encoder``, ``intermediate``, ``head``; a part the model lacks needs none).
        Each group carries its part's name under ``"name"``."""
        unknown = sorted(set(lrs) - set(PARTS))
        if unknown:
            raise XMLSparseError(
                f"learning rates given for unknown parts {unknown}; the parts are {', '.join(PARTS)}"
            )
        groups = []
        for name, module in self.parts().items():
            if name not in lrs:
                raise XMLSparseError(f"no learning rate given for the model's {name}")
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lrs[name], "name": name})
        return groups

    def memory_report(self) -> dict[str, int]:
        """Bytes held by each part: ``encoder``, ``intermediate``, ``head_params`` (weights and
        bias of the head), ``head_indices`` (the head's connection table, 0 for dense heads),
        and ``total``."""
        intermediate = self.intermediate
        report = {
            "encoder": _nbytes(list(self.encoder.parameters()) + list(self.encoder.buffers())),
            "intermediate": 0
            if intermediate is None
            else _nbytes(list(intermediate.parameters()) + list(intermediate.buffers())),
            "head_params": _nbytes(self.head.parameters()),
            "head_indices": _nbytes(self.head.buffers()),
        }
        report["total"] = sum(report.values())
        return report


def _build_encoder(cfg: EncoderConfig, n_features: int, feature_kind: str) -> nn.Module:
    if (cfg.type or feature_kind) == "bow":
        return BowEncoder(n_features, cfg.dim, cfg.hidden, cfg.dropout, cfg.activation, cfg.input_dropout)
    return DenseEncoder(n_features, cfg.hidden, cfg.dropout, cfg.activation)


def _build_head(cfg: HeadConfig, in_features: int, n_labels: int, impl: str) -> nn.Module:
    if cfg.type == "fixed-fanin":
        n_dense = dense_label_count(cfg.dense_head_labels, n_labels) if cfg.dense_head_labels else 0
        sparse = FixedFanInLinear(in_features, n_labels - n_dense, cfg.fan_in, impl=impl, group_size=cfg.group_size)
        return HeadTailLinear(in_features, n_dense, sparse) if n_dense else sparse
    if cfg.type == "dense":
        return nn.Linear(in_features, n_labels)
    if cfg.type == "bottleneck":
        return nn.Sequential(nn.Linear(in_features, cfg.rank), make_activation(cfg.activation), nn.Linear(cfg.rank, n_labels))
    # A section made in code rather than read by config_from_dict has had no check of its choices.
    raise XMLSparseError(f"model.head.type = {cfg.type!r}: expected one of {', '.join(CHOICES['model.head.type'])}")


def build_model(
    model_cfg: ModelConfig,
    n_features: int,
    n_labels: int,
    feature_kind: str,
    impl: str | None = None,
) -> XMCModel:
    """The model described by the config's ``model:`` section, as ``config_from_dict`` (or
    ``load_config``) validated it: ``build_model(config.model, ..., config.data.features)``.

    ``n_features`` is the vocabulary size for ``bow`` features and the row width for ``dense``
    ones. ``impl`` (auto | triton | reference) picks the fixed fan-in op, overriding
    ``model.head.impl``. The ``rewire`` subsection belongs to the trainer.
    """
    # Only now is the width of dense features known, which may be what the head reads.
    check_model_fits(model_cfg, feature_kind, n_features)
    encoder = _build_encoder(model_cfg.encoder, n_features, feature_kind)
    width = encoder.out_dim
    intermediate = None
    if model_cfg.intermediate is not None:
        size = model_cfg.intermediate.size
        intermediate = nn.Sequential(nn.Linear(width, size), make_activation(model_cfg.intermediate.activation))
        width = size
    head = _build_head(model_cfg.head, width, n_labels, impl if impl is not None else model_cfg.head.impl)
    return XMCModel(encoder, intermediate, head)
