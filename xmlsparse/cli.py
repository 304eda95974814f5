"""The `xmlsparse` command: each command a thin shell over the modules that do the work."""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from xmlsparse.errors import XMLSparseError

app = typer.Typer(
    help="Extreme multi-label classification with sparse fixed fan-in output layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-input error into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except XMLSparseError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise XMLSparseError(f"--k {text!r}: expected comma-separated positive integers, like 1,3,5") from None
    if not ks or min(ks) < 1:
        raise XMLSparseError(f"--k {text!r}: expected comma-separated positive integers, like 1,3,5")
    return ks


def _print_metrics(metrics: dict[str, float]) -> None:
    """A table of values x100, one row per metric family, one column per k."""
    families: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if "@" in key:
            name, k = key.split("@")
            families.setdefault(name, {})[int(k)] = value
    ks = sorted({k for row in families.values() for k in row})
    typer.echo("metric   " + "".join(f"{'@' + str(k):>9}" for k in ks))
    for name, row in families.items():
        typer.echo(f"{name:<9}" + "".join(f"{100 * row[k]:>9.2f}" if k in row else f"{'':>9}" for k in ks))


def _print_frequency_table(rows: list[dict[str, Any]]) -> None:
    """P@k and PSP@k x100 by training label-frequency bucket, one row per bucket, head first."""
    columns = [key for key in rows[0] if key.startswith(("P@", "PSP@"))]
    typer.echo("by training label frequency (buckets of about equal label mass; P and PSP sum to the overall):")
    typer.echo(f"{'bucket':<9}{'labels':>8}{'freq range':>14}" + "".join(f"{key:>9}" for key in columns))
    for row in rows:
        freq_range = f"{row['freq_min']}-{row['freq_max']}" if row["labels"] else "-"
        typer.echo(f"{row['bucket']:<9}{row['labels']:>8}{freq_range:>14}"
                   + "".join(f"{100 * row[key]:>9.2f}" for key in columns))


@app.command()
@one_line_errors
def datasets(root: Path = typer.Option(Path("data"), help="Dataset root folder.")) -> None:
    """List the standard data sets with their shapes and whether each is present locally."""
    from xmlsparse.data.datasets import dataset_rows, format_dataset_rows

    typer.echo(format_dataset_rows(dataset_rows(root)))


@app.command("download-dataset")
@one_line_errors
def download_dataset_command(
    name: str = typer.Argument(..., help="Registry name, e.g. amazon-670k (see `xmlsparse datasets`)."),
    root: Path = typer.Option(Path("data"), help="Dataset root folder."),
    variant: str = typer.Option("bow", help="bow (tf-idf features) or raw (texts)."),
    url: Optional[str] = typer.Option(None, help="A mirror of your own to fetch the archive from."),
    from_file: Optional[Path] = typer.Option(None, help="Install an archive fetched by other means."),
) -> None:
    """Fetch, verify, extract and convert a standard data set."""
    from xmlsparse.data.download import download_dataset

    if variant not in ("bow", "raw"):
        raise XMLSparseError(f"--variant {variant!r}: expected bow or raw")
    with warnings.catch_warnings():
        # A count mismatch is reported once, through progress, rather than twice.
        warnings.simplefilter("ignore", UserWarning)
        path = download_dataset(
            name, root=root, variant=variant, url=url, from_file=from_file,
            progress=lambda message: typer.echo(message, err=True),
        )
    typer.echo(f"{name} is ready in {path}")


@app.command()
@one_line_errors
def synth(
    like: Optional[str] = typer.Option(None, help="Copy the shape of a registry data set, e.g. amazon-670k."),
    scale: float = typer.Option(1.0, help="Multiplies points and labels of --like."),
    features: str = typer.Option("dense", help="dense (d-dimensional rows) or bow (sparse tf-idf)."),
    dim: Optional[int] = typer.Option(None, help="Width of dense features (default 768, or the preset's)."),
    n_train: Optional[int] = typer.Option(None, help="Training points (without --like)."),
    n_test: Optional[int] = typer.Option(None, help="Test points (without --like)."),
    n_labels: Optional[int] = typer.Option(None, help="Labels (without --like)."),
    n_features: Optional[int] = typer.Option(None, help="BoW vocabulary size (without --like)."),
    labels_per_point: Optional[float] = typer.Option(None, help="Mean labels per point."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same files."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: data/synthetic-...)."),
) -> None:
    """Generate a seeded synthetic data set with XMC statistics (power-law label frequencies)."""
    from xmlsparse.data.synthetic import generate

    if out is None:
        suffix = f"-{like}" + (f"-x{scale:g}" if scale != 1.0 else "") if like else ""
        out = Path("data") / f"synthetic{suffix}-{features}"
    path = generate(
        out, like=like, scale=scale, n_train=n_train, n_test=n_test, n_labels=n_labels,
        n_features=n_features, labels_per_point=labels_per_point, features=features, dim=dim, seed=seed,
    )
    typer.echo(f"synthetic data set written to {path}")


@app.command()
@one_line_errors
def train(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/quickstart.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the config's, auto)."),
) -> None:
    """Train a model; writes a run directory with checkpoints, metrics.jsonl and final.json."""
    from xmlsparse.config import load_config
    from xmlsparse.train.trainer import resume_run, start_run

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise XMLSparseError(f"--device {device!r}: expected cpu, cuda or auto")
    if resume is not None:
        trainer = resume_run(resume, device)
    else:
        overrides = list(set_) + ([f"train.device={device}"] if device else [])
        cfg = load_config(config, overrides)
        run_dir = out if out is not None else Path("runs") / config.stem
        trainer = start_run(cfg, run_dir)
    final = trainer.fit()
    if final is None:
        raise typer.Exit(130)
    typer.echo(f"test metrics of the best checkpoint ({trainer.run_dir / 'final.json'}):")
    _print_metrics(final["test"])


@app.command(name="eval")
@one_line_errors
def eval_command(
    run_dir: Optional[Path] = typer.Argument(None, help="A run directory written by `xmlsparse train`."),
    split: str = typer.Option("test", help="test or val (with RUN_DIR)."),
    k: str = typer.Option("1,3,5", help="Comma-separated k values."),
    save_predictions: bool = typer.Option(False, help="Write the top-k predictions into RUN_DIR."),
    predictions: Optional[Path] = typer.Option(None, help="Score a prediction file (npz CSR or label:score lines)."),
    truth: Optional[Path] = typer.Option(None, help="Test data of the prediction file."),
    train_data: Optional[Path] = typer.Option(None, "--train", help="Training data (label frequencies for PSP@k)."),
    a: Optional[float] = typer.Option(None, "--A", help="Propensity parameter A."),
    b: Optional[float] = typer.Option(None, "--B", help="Propensity parameter B."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write the metrics (fractions) as JSON; the frequency table goes under by_frequency.",
    ),
    buckets: Optional[int] = typer.Option(
        None, help="Label-frequency buckets of the second table (default 3; a prediction file needs --train; 0: none).",
    ),
) -> None:
    """Evaluate a run directory, or score a prediction file against a data set; a second table splits
    P@k and PSP@k by the labels' training frequency (head, torso, tail)."""
    from xmlsparse.evaluate import evaluate_predictions_file, evaluate_run_dir
    from xmlsparse.metrics import DEFAULT_BUCKETS
    from xmlsparse.train.trainer import write_json

    ks = _parse_ks(k)
    if predictions is not None:
        if run_dir is not None:
            raise XMLSparseError("give either RUN_DIR or --predictions with --truth, not both")
        if truth is None:
            raise XMLSparseError("--predictions needs --truth TEST (the data set the predictions are for)")
        if buckets is not None and buckets > 0 and train_data is None:
            raise XMLSparseError(f"--buckets {buckets} needs --train TRAIN (the training label frequencies)")
        metrics, table = evaluate_predictions_file(
            predictions, truth, ks, train_data, a, b, DEFAULT_BUCKETS if buckets is None else buckets,
        )
    elif run_dir is not None:
        if split not in ("test", "val"):
            raise XMLSparseError(f"--split {split!r}: expected test or val")
        metrics, table = evaluate_run_dir(
            run_dir, split, ks, save_predictions, DEFAULT_BUCKETS if buckets is None else buckets,
        )
    else:
        raise XMLSparseError("give a RUN_DIR, or --predictions PRED --truth TEST")
    _print_metrics(metrics)
    if table is not None:
        typer.echo("")
        _print_frequency_table(table)
    if json_out is not None:
        write_json(json_out, metrics if table is None else {**metrics, "by_frequency": table})


@app.command()
@one_line_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `xmlsparse train`."),
    input_path: Path = typer.Argument(..., metavar="INPUT", help="XC text or npz features (dense: .npy)."),
    top_k: int = typer.Option(5, help="Labels per point."),
    out: Optional[Path] = typer.Option(None, help="Output: .npz (CSR scores) or text label:score lines."),
) -> None:
    """Write the top-k labels of every point of INPUT."""
    from xmlsparse.evaluate import predict_file

    target = predict_file(run_dir, input_path, top_k, out)
    typer.echo(f"predictions written to {target}")


@app.command("tune")
@one_line_errors
def tune_command(
    config: Path = typer.Argument(..., help="YAML config; its train.early_stopping.metric is maximised."),
    trials: int = typer.Option(..., help="Trials to run in this call (a study already in --out continues)."),
    timeout: Optional[float] = typer.Option(None, help="Start no new trial after this many seconds."),
    set_: list[str] = typer.Option([], "--set", help="Override a key in every trial: --set train.epochs=10."),
    out: Optional[Path] = typer.Option(None, help="Study folder (default: runs/tune-<config name>)."),
    space: Optional[Path] = typer.Option(None, help="YAML search space: dotted key -> {type, low, high, log, choices}."),
) -> None:
    """Search hyper-parameters with Optuna on the validation split; writes best.yaml for `train`."""
    from xmlsparse.tune import format_trials, tune_config

    if trials < 1:
        raise XMLSparseError(f"--trials {trials}: expected a positive number of trials")
    if timeout is not None and timeout <= 0:
        raise XMLSparseError(f"--timeout {timeout:g}: expected a positive number of seconds")
    out = out if out is not None else Path("runs") / f"tune-{config.stem}"
    result = tune_config(config, trials, out, list(set_), space, timeout)
    typer.echo(format_trials(result))
    if result.best is None:
        typer.echo(f"no trial has completed yet, so there is no best config (study in {out / 'study.db'})")
    else:
        typer.echo(f"best: trial {result.best['trial']}, validation {result.metric} "
                   f"{100 * result.best['value']:.2f}; train its config with")
        typer.echo(f"  xmlsparse train {result.best_config} --out {out / 'best'}")
    if result.interrupted:
        typer.echo(f"interrupted: the same command continues the study in {out}", err=True)
        raise typer.Exit(130)


def main() -> None:
    app(prog_name="xmlsparse")


if __name__ == "__main__":
    sys.exit(main())
