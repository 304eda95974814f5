"""The classifier: encoder -> optional dense intermediate layer -> output head, built from the
``model:`` section of the config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from xmlsparse.data.batches import Batch
from xmlsparse.errors import XMLSparseError
from xmlsparse.nn.encoders import ACTIVATIONS, BowEncoder, DenseEncoder, make_activation
from xmlsparse.nn.sparse_linear import FixedFanInLinear
from xmlsparse.ops import IMPLS, fixed_fanin

PARTS = ("encoder", "intermediate", "head")
HEAD_TYPES = ("fixed-fanin", "dense", "bottleneck")
FEATURE_KINDS = ("bow", "dense")

# Keys each subsection understands, with their defaults. A key set to None takes its default, so
# a section written out in full by the config schema (every head key, whatever the head type)
# is accepted as well as a short hand-written one.
ENCODER_DEFAULTS: dict[str, Any] = {
    "type": None,  # None: the kind of the data's features
    "dim": 512,  # bow embedding size
    "input_dropout": 0.0,  # bow: share of a document's words dropped in training
    "hidden": [],
    "dropout": 0.1,
    "activation": "relu",
}
INTERMEDIATE_DEFAULTS: dict[str, Any] = {"size": 65536, "activation": "relu"}
HEAD_DEFAULTS: dict[str, Any] = {
    "type": "fixed-fanin",
    "fan_in": 64,
    "rank": 64,
    "activation": "relu",
    "impl": "auto",
}


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
        h = self.features(batch)
        head = self.head
        if isinstance(head, nn.Sequential):  # bottleneck: the low-rank part once, then label slices
            h, head = head[:-1](h), head[-1]
        # Under autocast, the bf16 copies of the layers below (the intermediate weight: 96 MiB at
        # 65,536 x 768) are cached until the autocast region ends; no label block needs them.
        torch.clear_autocast_cache()
        n_labels = head.out_features
        for start in range(0, n_labels, block):
            stop = min(start + block, n_labels)
            bias = None if head.bias is None else head.bias[start:stop]
            if isinstance(head, FixedFanInLinear):
                logits = fixed_fanin(h, head.indices[start:stop], head.weight[start:stop], bias, impl=head.impl)
            else:
                logits = F.linear(h, head.weight[start:stop], bias)
            yield start, logits

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


def _section(cfg: Mapping[str, Any] | None, defaults: dict[str, Any], key: str) -> dict[str, Any]:
    """``cfg`` merged over ``defaults``; unknown keys are an error naming ``key``."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise XMLSparseError(f"{key} must be a mapping, got {cfg!r}")
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise XMLSparseError(f"unknown key {key}.{unknown[0]} (valid keys here: {', '.join(defaults)})")
    return {name: default if cfg.get(name) is None else cfg[name] for name, default in defaults.items()}


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise XMLSparseError(f"{key} must be a positive integer, got {value!r}")
    return value


def _activation_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or value not in ACTIVATIONS:
        raise XMLSparseError(f"{key}: unknown activation {value!r}; expected one of {', '.join(ACTIVATIONS)}")
    return value


def _dropout_rate(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise XMLSparseError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def _build_encoder(cfg: dict[str, Any], n_features: int, feature_kind: str) -> nn.Module:
    kind = cfg["type"] or feature_kind
    if kind not in FEATURE_KINDS:
        raise XMLSparseError(f"model.encoder.type must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if kind != feature_kind:
        raise XMLSparseError(
            f"model.encoder.type is {kind!r} but the data's features are {feature_kind!r} (data.features); "
            "they must agree"
        )
    hidden = cfg["hidden"]
    if not isinstance(hidden, (list, tuple)):
        raise XMLSparseError(f"model.encoder.hidden must be a list of layer sizes, got {hidden!r}")
    for size in hidden:
        _positive_int(size, "model.encoder.hidden entries")
    dropout = _dropout_rate(cfg["dropout"], "model.encoder.dropout")
    activation = _activation_name(cfg["activation"], "model.encoder.activation")
    if kind == "bow":
        dim = _positive_int(cfg["dim"], "model.encoder.dim")
        input_dropout = _dropout_rate(cfg["input_dropout"], "model.encoder.input_dropout")
        return BowEncoder(n_features, dim, hidden, dropout, activation, input_dropout)
    return DenseEncoder(n_features, hidden, dropout, activation)


def _build_head(cfg: dict[str, Any], in_features: int, n_labels: int, impl: str) -> nn.Module:
    kind = cfg["type"]
    if kind == "fixed-fanin":
        fan_in = _positive_int(cfg["fan_in"], "model.head.fan_in")
        if fan_in > in_features:
            raise XMLSparseError(
                f"model.head.fan_in = {fan_in} exceeds the {in_features} inputs the head reads "
                "(the intermediate size, or the encoder's output size without one)"
            )
        if impl not in IMPLS:
            raise XMLSparseError(f"model.head.impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        return FixedFanInLinear(in_features, n_labels, fan_in, impl=impl)
    if kind == "dense":
        return nn.Linear(in_features, n_labels)
    if kind == "bottleneck":
        rank = _positive_int(cfg["rank"], "model.head.rank")
        activation = make_activation(_activation_name(cfg["activation"], "model.head.activation"))
        return nn.Sequential(nn.Linear(in_features, rank), activation, nn.Linear(rank, n_labels))
    raise XMLSparseError(f"model.head.type must be one of {', '.join(HEAD_TYPES)}, got {kind!r}")


def build_model(
    model_cfg: Mapping[str, Any],
    n_features: int,
    n_labels: int,
    feature_kind: str,
    impl: str | None = None,
) -> XMCModel:
    """The model described by the config's ``model:`` section (a plain mapping).

    ``n_features`` is the vocabulary size for ``bow`` features and the row width for ``dense``
    ones. ``impl`` (auto | triton | reference) picks the fixed fan-in op, overriding
    ``model.head.impl``. Other keys of the section (``rewire``) belong to other modules.
    """
    if feature_kind not in FEATURE_KINDS:
        raise XMLSparseError(f"data.features must be one of {', '.join(FEATURE_KINDS)}, got {feature_kind!r}")
    _positive_int(n_features, "the number of features")
    _positive_int(n_labels, "the number of labels")
    encoder_cfg = _section(model_cfg.get("encoder"), ENCODER_DEFAULTS, "model.encoder")
    encoder = _build_encoder(encoder_cfg, n_features, feature_kind)
    width = encoder.out_dim

    intermediate = None
    if model_cfg.get("intermediate") is not None:
        cfg = _section(model_cfg["intermediate"], INTERMEDIATE_DEFAULTS, "model.intermediate")
        size = _positive_int(cfg["size"], "model.intermediate.size")
        activation = make_activation(_activation_name(cfg["activation"], "model.intermediate.activation"))
        intermediate = nn.Sequential(nn.Linear(width, size), activation)
        width = size

    head_cfg = _section(model_cfg.get("head"), HEAD_DEFAULTS, "model.head")
    head = _build_head(head_cfg, width, n_labels, impl if impl is not None else head_cfg["impl"])
    return XMCModel(encoder, intermediate, head)
