"""Data whose label sets are a tree node and its ancestors (the shape of WordNet's hypernyms), and
tiny runs on it, for the tests of label implications and of what scores with them."""

from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from xmlsparse.cli import app

# A tree of 21 labels: 3 roots, 2 children each, 2 grandchildren each (parent of label i).
TREE_PARENT = [-1, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]
WORDS_PER_LABEL = 6


def write_hierarchical_xc_text(path: Path, rng: np.random.Generator, n_points: int) -> None:
    """XC text ("N D L", then "l1,l2 f:v ...") whose label sets are a tree node and its ancestors, and
    whose words are drawn from those labels' own words, plus noise words."""
    n_labels = len(TREE_PARENT)
    n_features = n_labels * WORDS_PER_LABEL + 20
    lines = [f"{n_points} {n_features} {n_labels}"]
    for _ in range(n_points):
        node, chain = int(rng.integers(0, n_labels)), []
        while node >= 0:
            chain.append(node)
            node = TREE_PARENT[node]
        words: dict[int, int] = {}
        for label in chain:
            for word in rng.choice(WORDS_PER_LABEL, size=3, replace=False):
                feature = label * WORDS_PER_LABEL + int(word)
                words[feature] = words.get(feature, 0) + 1
        for feature in rng.integers(n_labels * WORDS_PER_LABEL, n_features, size=2):
            words[int(feature)] = words.get(int(feature), 0) + 1
        pairs = " ".join(f"{feature}:{count}" for feature, count in sorted(words.items()))
        lines.append(f"{','.join(map(str, sorted(chain)))} {pairs}")
    path.write_text("\n".join(lines) + "\n")


def train(folder: Path, data: Path, implications: dict | None, split: dict | None = None,
          train_keys: dict | None = None) -> Path:
    """A tiny run on ``data`` in ``folder``; ``split`` adds keys of the data section (the validation
    split's), ``train_keys`` keys of the train section."""
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"dataset": str(data), "features": "bow", "validation": 0.1, **(split or {})},
        "model": {"encoder": {"dim": 24}, "intermediate": {"size": 24}, "head": {"type": "fixed-fanin", "fan_in": 6},
                  "rewire": {"interval": 5}},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "checkpoint": {"background": False},
                  **(train_keys or {})},
        **({} if implications is None else {"eval": {"implications": implications}}),
    }))
    run = folder / "run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return run
