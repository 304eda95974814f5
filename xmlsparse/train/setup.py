"""What a run needs before its first step, shared by training, evaluation and prediction:
the device, the data with its validation split and propensities, and the model of a config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
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
    preprocess: Callable[[XMCData], XMCData]  # fitted on train; applied to train, test and new inputs


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise XMLSparseError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def prepare_data(config: Config) -> PreparedData:
    """Load the data set, carve the seeded validation split out of train, and count propensities."""
    train, test, info = load_dataset(config.data.dataset, Path(config.data.root), config.data.features)
    preprocess = fit_preprocessing(config, train)
    train, test = preprocess(train), preprocess(test)
    a, b = (info.propensity_a, info.propensity_b) if info is not None else DEFAULT_PROPENSITY
    inv_prop = inverse_propensity(label_frequencies(train.Y), train.n_points, a, b)
    train_rows, val_rows = split_validation(train.n_points, config.data.validation, config.train.seed)
    name = info.name if info is not None else str(config.data.dataset)
    return PreparedData(train, train_rows, val_rows, test, inv_prop, name, preprocess)


def fit_preprocessing(config: Config, train: XMCData) -> Callable[[XMCData], XMCData]:
    """The feature transform of ``config.data`` fitted on ``train``: for BoW, optionally the training
    split's smoothed idf (``tfidf: auto`` applies it to whole-number features only), then
    optionally unit L2 rows; dense rows pass unchanged. Every input the model sees (train, test,
    ``xmlsparse predict`` files) goes through the same transform."""
    if config.data.features != "bow":
        return lambda data: data
    idf = None
    use_idf = config.data.tfidf
    if use_idf == "auto":
        use_idf = whole_number_values(train.X)
    if use_idf:
        idf = sklearn.feature_extraction.text.TfidfTransformer(norm=None, smooth_idf=True).fit(train.X)

    def preprocess(data: XMCData) -> XMCData:
        if idf is not None:
            data = replace(data, X=idf.transform(data.X).astype(np.float32))
        return normalized_rows(data) if config.data.normalize else data

    return preprocess


def whole_number_values(X: sp.spmatrix) -> bool:
    """True when every stored value of ``X`` is a whole number: binary or count features, which
    idf weighting turns into tf-idf, unlike features that are real-valued already."""
    values = sp.csr_matrix(X).data
    return bool(np.all(values == np.floor(values)))


def normalized_rows(data: XMCData) -> XMCData:
    """``data`` with its sparse feature rows scaled to unit L2 norm (empty rows stay empty)."""
    return replace(data, X=sklearn.preprocessing.normalize(data.X, norm="l2", copy=True))


def model_for(config: Config, train: XMCData, device: torch.device) -> XMCModel:
    """The model of ``config`` sized for ``train``'s features and labels, on ``device``."""
    model = build_model(config_to_dict(config)["model"], train.n_features, train.n_labels, config.data.features)
    return model.to(device)
