"""Checkpoints written atomically, so that a kill at any moment leaves the previous one intact."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmlsparse.atomic import atomic_write

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`: a kill mid-save leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    """Every generator a training step draws from (dropout, shuffling helpers)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
