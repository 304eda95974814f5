"""Keep a seeded share of a training file's points aside as a second test set.

Writes OUT/train.txt (the other points) and OUT/test.txt (the points kept aside) in XC text
format, so that choices that cannot be made on a validation split, such as how many points to
hold out for it, are scored without touching the real test split:

    python scripts/holdout_split.py ../shared/datasets/wordnet-hypernyms/train.txt runs/wn-nested
    xmlsparse train configs/wordnet-hypernyms.yaml --set data.dataset=runs/wn-nested --out runs/nested
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from xmlsparse.data.formats import read_xc_text, write_xc_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train", type=Path, help="a training file in XC text format")
    parser.add_argument("out", type=Path, help="the folder to write train.txt and test.txt into")
    parser.add_argument("--share", type=float, default=0.1, help="share of the points kept aside, in (0, 1)")
    parser.add_argument("--seed", type=int, default=20261201, help="seed of the points kept aside")
    args = parser.parse_args()
    if not 0 < args.share < 1:
        parser.error(f"--share {args.share}: expected a value in (0, 1)")

    data = read_xc_text(args.train)
    n_aside = int(round(args.share * data.n_points))
    if not 0 < n_aside < data.n_points:
        parser.error(f"--share {args.share} of {data.n_points} points keeps {n_aside} aside; both parts need a point")
    aside = np.zeros(data.n_points, dtype=bool)
    aside[np.random.default_rng(args.seed).choice(data.n_points, n_aside, replace=False)] = True
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.txt", ~aside), ("test.txt", aside)):
        write_xc_text(args.out / name, replace(data, X=data.X[rows], Y=data.Y[rows]))
    print(f"{args.out}: {data.n_points - n_aside:,} training points, {n_aside:,} kept aside")


if __name__ == "__main__":
    main()
