"""What a run needs before its first step, shared by training, evaluation and prediction:
the device, the data with its validation split and propensities, and the model of a config."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sklearn.feature_extraction.text
import sklearn.preprocessing
import torch

from xmlsparse.config import Config, config_to_dict
from xmlsparse.data.batches import split_validation
from xmlsparse.data.datasets import load_dataset
from xmlsparse.data.formats import XMCData
from xmlsparse.errors import XMLSparseError
from xmlsparse.metrics import DEFAULT_PROPENSITY, inverse_propensity, label_frequencies
from xmlsparse.nn.model import XMCModel, build_model

@dataclass
class PreparedData:
    train: XMCData  # the whole training file; train_rows / val_rows select the two parts
    train_rows: np.ndarray
    val_rows: np.ndarray
    test: XMCData
    inv_propensity: np.ndarray
    name: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise XMLSparseError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def prepare_data(config: Config) -> PreparedData:
    """Load the data set, carve the seeded validation split out of train, and count propensities."""
    train, test, info = load_dataset(config.data.dataset, Path(config.data.root), config.data.features)
    if config.data.features == "bow":
        if config.data.tfidf:
            train, test = idf_weighted(train, test)
        if config.data.normalize:
            train, test = normalized_rows(train), normalized_rows(test)
    a, b = (info.propensity_a, info.propensity_b) if info is not None else DEFAULT_PROPENSITY
    inv_prop = inverse_propensity(label_frequencies(train.Y), train.n_points, a, b)
    train_rows, val_rows = split_validation(train.n_points, config.data.validation, config.train.seed)
    name = info.name if info is not None else str(config.data.dataset)
    return PreparedData(train, train_rows, val_rows, test, inv_prop, name)


def idf_weighted(train: XMCData, test: XMCData) -> tuple[XMCData, XMCData]:
    """Both splits' feature values times the smoothed idf of the training split."""
    idf = sklearn.feature_extraction.text.TfidfTransformer(norm=None, smooth_idf=True).fit(train.X)
    return replace(train, X=idf.transform(train.X).astype(np.float32)), replace(
        test, X=idf.transform(test.X).astype(np.float32)
    )


def normalized_rows(data: XMCData) -> XMCData:
    """``data`` with its sparse feature rows scaled to unit L2 norm (empty rows stay empty)."""
    return replace(data, X=sklearn.preprocessing.normalize(data.X, norm="l2", copy=True))


def model_for(config: Config, train: XMCData, device: torch.device) -> XMCModel:
    """The model of ``config`` sized for ``train``'s features and labels, on ``device``."""
    model = build_model(config_to_dict(config)["model"], train.n_features, train.n_labels, config.data.features)
    return model.to(device)
