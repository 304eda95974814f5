"""Ensemble directories (``xmlsparse ensemble``): finished runs of the same data scored as one model,
the mean of their logits.

An ensemble directory holds the first member's config (its data and eval settings are every
member's), the stored preprocessing, ``ensemble.json`` naming the members by absolute path, and
``final.json`` with the ensemble's validation and test metrics. ``eval`` and ``predict`` read it as
they read a run directory; the members' checkpoints stay where they are.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xmlsparse.atomic import write_json
from xmlsparse.config import Config, save_config
from xmlsparse.errors import XMLSparseError
from xmlsparse.metrics import DEFAULT_BUCKETS
from xmlsparse.outputs import check_output_dir
from xmlsparse.runs import ENSEMBLE_FILE, check_run_dir, ensemble_members, load_run, model_checkpoints, score_split
from xmlsparse.train.setup import (
    IDF_FILE,
    IMPLICATIONS_FILE,
    LABEL_MAP_FILE,
    LABEL_ORDER_FILE,
    RUN_INPUTS_FILE,
    load_run_inputs,
)

# What a member's directory keeps for scoring, copied from the first member.
RUN_INPUT_FILES = (RUN_INPUTS_FILE, IDF_FILE, LABEL_MAP_FILE, LABEL_ORDER_FILE, IMPLICATIONS_FILE)


def _flat(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}.{key}"
        flat.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return flat


def _check_same_data(first: Path, first_config: Config, member: Path, config: Config) -> None:
    """Members must score the same points the same way: the same ``data:`` section (so the same
    validation points too) and the same stored preprocessing."""
    ours, theirs = _flat(asdict(first_config.data), "data"), _flat(asdict(config.data), "data")
    for key in ours:
        if ours[key] != theirs.get(key):
            raise XMLSparseError(
                f"{member}: {key} is {theirs.get(key)!r}, but {ours[key]!r} in {first}; the members of an "
                "ensemble must be trained on the same data with the same validation split"
            )
    for name in RUN_INPUT_FILES:
        a, b = first / name, member / name
        if a.exists() != b.exists() or (a.exists() and not filecmp.cmp(a, b, shallow=False)):
            raise XMLSparseError(f"{member}: its {name} differs from that of {first}; the members must share it")


def _member_test(member: Path) -> dict[str, float] | None:
    """A member's own test metrics from its final.json; None for a run not finished or not tested."""
    try:
        return json.loads((member / "final.json").read_text()).get("test")
    except (OSError, ValueError, AttributeError):
        return None


def check_members(members: Sequence[Path]) -> list[Path]:
    """The members as absolute paths, once each is a finished-or-not run of one model with a
    checkpoint, and all share their data; else one error naming the member and the difference."""
    if len(members) < 2:
        raise XMLSparseError(f"an ensemble needs at least two run directories, got {len(members)}")
    resolved = [Path(member).resolve() for member in members]
    for index, member in enumerate(resolved):
        if member in resolved[:index]:
            raise XMLSparseError(f"{members[index]} is given twice")
        check_run_dir(member)
        if ensemble_members(member) is not None:
            raise XMLSparseError(f"{members[index]} is an ensemble directory; give its members instead")
    configs = [model_checkpoints(member)[0][0] for member in resolved]
    for member in resolved:
        load_run_inputs(member)
    for member, config in zip(resolved[1:], configs[1:]):
        _check_same_data(resolved[0], configs[0], member, config)
    return resolved


def create_ensemble(
    members: Sequence[Path], out: Path, overwrite: bool = False, buckets: int = DEFAULT_BUCKETS
) -> dict[str, Any]:
    """Write the ensemble directory ``out`` of ``members`` and return its ``final.json``: the
    validation and test metrics of the mean logits, the test metrics by label-frequency bucket
    (``buckets`` of them, 0 for none), and each member's own test metrics from its final.json.

    The directory is built beside ``out`` and renamed into place once complete; an ``out`` that
    exists is refused unless ``overwrite`` (then replaced only at that last step)."""
    resolved = check_members(members)
    out = Path(out)
    if out.resolve() in resolved:
        raise XMLSparseError(f"--out {out} is one of the members")
    if out.exists() and not overwrite:
        raise XMLSparseError(f"{out} exists; replace it with --overwrite, or pick another --out")
    if out.exists() and not out.is_dir():
        raise XMLSparseError(f"{out} exists and is not a folder")
    check_output_dir(out.parent if out.parent != Path("") else Path("."))
    out.parent.mkdir(parents=True, exist_ok=True)
    config = model_checkpoints(resolved[0])[0][0]
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_config(config, building / "config.yaml")
        for name in RUN_INPUT_FILES:
            if (resolved[0] / name).exists():
                shutil.copy2(resolved[0] / name, building / name)
        write_json(building / ENSEMBLE_FILE, {"members": [str(member) for member in resolved]})
        loaded = load_run(building)  # the data and the members' models, read once for both splits
        validation, _ = score_split(*loaded, "val", config.eval.k, buckets=0)
        test, by_frequency = score_split(*loaded, "test", config.eval.k, buckets=buckets)
        final = {
            "members": [str(member) for member in resolved],
            "validation": validation,
            "test": test,
            **({} if by_frequency is None else {"test_by_frequency": by_frequency}),
            "members_test": [_member_test(member) for member in resolved],
        }
        write_json(building / "final.json", final)
        if out.exists():
            shutil.rmtree(out)
        building.rename(out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final
