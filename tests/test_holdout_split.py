"""scripts/holdout_split.py: a seeded share of a training file kept aside as a second test set."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmlsparse.data.formats import read_xc_text, write_xc_text
from xmlsparse.data.types import XMCData

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "holdout_split.py"


def xc_file(path: Path, n_points: int) -> Path:
    """A small XC text file whose every point has a label and a feature."""
    rng = np.random.default_rng(0)
    X = sp.random(n_points, 30, density=0.2, format="csr", random_state=1, dtype=np.float32)
    X = (X + sp.csr_matrix((np.ones(n_points, np.float32), (np.arange(n_points), rng.integers(0, 30, n_points))),
                           shape=(n_points, 30))).tocsr()
    Y = sp.csr_matrix((np.ones(n_points, np.float32), (np.arange(n_points), rng.integers(0, 17, n_points))),
                      shape=(n_points, 17))
    write_xc_text(path, XMCData(X=X, Y=Y, n_features=30, n_labels=17))
    return path


def run_script(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_the_parts_are_disjoint_complete_and_seeded(tmp_path):
    source = xc_file(tmp_path / "train.txt", 203)
    train = read_xc_text(source)
    done = run_script(source, tmp_path / "a", "--share", 0.2, "--seed", 5)
    assert done.returncode == 0, done.stderr
    kept, aside = read_xc_text(tmp_path / "a" / "train.txt"), read_xc_text(tmp_path / "a" / "test.txt")
    assert (kept.n_points, aside.n_points) == (162, 41)
    assert (kept.n_features, kept.n_labels) == (train.n_features, train.n_labels)
    # Every point lands in exactly one part: the two parts hold the file's points, each once.
    rows = [tuple(train.Y[i].indices) + tuple(np.round(train.X[i].data, 5)) for i in range(train.n_points)]
    parts = [tuple(p.Y[i].indices) + tuple(np.round(p.X[i].data, 5)) for p in (kept, aside) for i in range(p.n_points)]
    assert sorted(parts) == sorted(rows)
    again = run_script(source, tmp_path / "b", "--share", 0.2, "--seed", 5)
    assert again.returncode == 0
    assert (tmp_path / "a" / "test.txt").read_bytes() == (tmp_path / "b" / "test.txt").read_bytes()
    other = run_script(source, tmp_path / "c", "--share", 0.2, "--seed", 6)
    assert other.returncode == 0
    assert (tmp_path / "a" / "test.txt").read_bytes() != (tmp_path / "c" / "test.txt").read_bytes()


def test_a_share_outside_the_unit_interval_is_refused(tmp_path):
    done = run_script(xc_file(tmp_path / "train.txt", 20), tmp_path / "out", "--share", 1.0)
    assert done.returncode != 0 and "--share 1.0: expected a value in (0, 1)" in done.stderr
    assert not (tmp_path / "out").exists()
