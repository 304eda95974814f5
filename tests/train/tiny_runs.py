"""The config of the end-to-end training tests: a small dense model on the ``tiny_data`` set."""

from pathlib import Path

import yaml


def tiny_config(tmp_path: Path, data: Path, **train) -> Path:
    """A config file in ``tmp_path`` for three epochs on ``data``; ``train`` keys replace the defaults."""
    values = {
        "data": {"dataset": str(data), "features": "dense", "validation": 0.1},
        "model": {
            "encoder": {"type": "dense", "dropout": 0.1},
            "intermediate": {"size": 64},
            "head": {"type": "fixed-fanin", "fan_in": 8},
            "rewire": {"interval": 10, "fraction": 0.1, "stop": 0.66},
        },
        "train": {"epochs": 3, "batch_size": 32, "optimizer": {"lr": 3.0e-3}, "device": "cpu", **train},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path
