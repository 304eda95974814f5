"""Encoders: map a batch's input features to the representation the intermediate layer reads.

The rule for dropout is the same in both: it follows every representation an encoder produces
(for dense features the input itself is the first one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from xmlsparse.config import ACTIVATION_NAMES
from xmlsparse.data.batches import Batch
from xmlsparse.errors import XMLSparseError

# The module of each activation name. The names, the choices every ``activation`` key of a config
# is checked against, are config.ACTIVATION_NAMES: a name added there without a module here fails
# at import, not when a model first asks for it.
_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky-relu": nn.LeakyReLU,
    "identity": nn.Identity,
}
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {name: _MODULES[name] for name in ACTIVATION_NAMES}


def make_activation(name: str, key: str = "activation") -> nn.Module:
    """The activation module called ``name``; ``key`` names the setting in the error message."""
    if name not in ACTIVATIONS:
        raise XMLSparseError(f"{key}: unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _mlp(in_dim: int, hidden: Sequence[int], dropout: float, activation: str) -> nn.Sequential:
    """Linear -> activation -> dropout for each size in ``hidden``."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), make_activation(activation), _dropout(dropout)]
        in_dim = size
    return nn.Sequential(*layers)


class BowEncoder(nn.Module):
    """Sparse bag-of-words rows -> ``EmbeddingBag(sum)`` weighted by the feature values (tf-idf),
    plus a bias (together a linear layer over the vocabulary) -> activation -> dropout -> MLP."""

    def __init__(
        self,
        n_features: int,
        dim: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # Dropping whole words of a document: on small data sets it regularises the vocabulary
        # embedding much as L2 does a linear model.
        self.input_dropout = _dropout(input_dropout)
        self.embedding = nn.EmbeddingBag(n_features, dim, mode="sum")
        self.bias = nn.Parameter(torch.zeros(dim))
        self.activation = make_activation(activation)
        self.dropout = _dropout(dropout)
        self.mlp = _mlp(dim, hidden, dropout, activation)
        self.out_dim = hidden[-1] if len(hidden) else dim

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.x_indices is None:
            raise ValueError("BowEncoder needs bag-of-words batches (x_indices, x_weights, x_offsets)")
        weights = self.input_dropout(batch.x_weights)
        embedded = self.embedding(batch.x_indices, batch.x_offsets, per_sample_weights=weights)
        return self.mlp(self.dropout(self.activation(embedded + self.bias)))


class DenseEncoder(nn.Module):
    """Dense feature rows -> dropout -> optional MLP; with no hidden layers the output is the input
    (after dropout), of size ``in_dim``."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.dropout = _dropout(dropout)
        self.mlp = _mlp(in_dim, hidden, dropout, activation)
        self.out_dim = hidden[-1] if len(hidden) else in_dim

    def forward(self, batch: Batch) -> torch.Tensor:
        if batch.x_dense is None:
            raise ValueError("DenseEncoder needs dense batches (x_dense)")
        return self.mlp(self.dropout(batch.x_dense))
