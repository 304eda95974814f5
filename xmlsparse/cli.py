"""The `xmlsparse` command: each command a thin shell over the modules that do the work."""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from xmlsparse.errors import XMLSparseError
from xmlsparse.outputs import check_output_dir, check_output_file

if TYPE_CHECKING:
    from xmlsparse.parallel.world import World


class _ClickStyleHelp:
    """Help that shows no value type beside a flag, where typer writes ``<bool>``, and names
    arguments in capitals (CONFIG, RUN_DIR) as click does."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        # Here rather than at construction: the --help option is only made on demand.
        for param in params:
            if param.metavar is None:
                if isinstance(param, TyperOption) and param.is_flag:
                    param.metavar = ""
                elif isinstance(param, TyperArgument):
                    param.metavar = param.name.upper()
        return params


class _Group(_ClickStyleHelp, TyperGroup):
    """The ``xmlsparse`` group, with the help of ``_ClickStyleHelp``."""


def _reflow(text: str | None) -> str | None:
    """A docstring with each paragraph on one line: typer's rich help keeps the source's line
    breaks, which then cut the help's own wrapping short mid-line."""
    if text is None:
        return None
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


class _Command(_ClickStyleHelp, TyperCommand):
    """A command with the help of ``_ClickStyleHelp``, help paragraphs reflowed, and a usage line in
    click's form: ``CONFIG`` for a required argument and ``[RUN_DIR]`` for an optional one, where
    typer writes ``{config}``."""

    def __init__(self, *args: Any, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, help=_reflow(help), **kwargs)

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        return pieces


class _App(typer.Typer):
    """A typer app whose commands are ``_Command`` unless a command asks for another class."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any) -> Callable:
        return super().command(*args, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xmlsparse")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"xmlsparse {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit.",
    ),
) -> None:
    """Extreme multi-label classification with sparse fixed fan-in output layers."""


def os_error_line(error: OSError) -> str:
    """An OS error as one line naming its path(s): ``path: strerror`` (``src -> dst: ...`` for a rename)."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
    return f"{paths}: {reason}"


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-input error into one line on stderr and exit status 2, and an OS error that
    no check caught beforehand (a disk that filled up, a folder made read-only meanwhile) into one
    line and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except XMLSparseError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except OSError as error:
            typer.echo(f"error: {os_error_line(error)}", err=True)
            raise typer.Exit(1) from None

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
    force: bool = typer.Option(
        False, "--force",
        help="Install an archive whose counts differ from the registry's (features, labels, points beyond 1%).",
    ),
) -> None:
    """Fetch, verify, extract and convert a standard data set."""
    from xmlsparse.data.download import download_dataset

    if variant not in ("bow", "raw"):
        raise XMLSparseError(f"--variant {variant!r}: expected bow or raw")
    with warnings.catch_warnings():
        # A count mismatch is reported once, through progress, rather than twice.
        warnings.simplefilter("ignore", UserWarning)
        path = download_dataset(
            name, root=root, variant=variant, url=url, from_file=from_file, force=force,
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
    try:
        path = generate(
            out, like=like, scale=scale, n_train=n_train, n_test=n_test, n_labels=n_labels,
            n_features=n_features, labels_per_point=labels_per_point, features=features, dim=dim, seed=seed,
            progress=lambda message: typer.echo(message, err=True),
        )
    except KeyboardInterrupt:
        # generate has removed its staging files by now; say so instead of printing a traceback
        typer.echo(f"interrupted: {out} is as it was before", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"synthetic data set written to {path}")


@app.command()
@one_line_errors
def train(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config, e.g. configs/quickstart.yaml; none with --resume, which uses the run's own.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", metavar="<key=value>",
        help="Override a key, e.g. --set train.epochs=5; a list: --set 'eval.k=[1,10]' (repeatable). "
        "With --resume only train.epochs=N, N more than the run's epochs.",
    ),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the run already in the run directory (once the config and data load).",
    ),
    resume: Optional[Path] = typer.Option(
        None, help="Continue the run in this directory, with its own config.yaml; a finished run is left as it is.",
    ),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the config's, auto)."),
) -> None:
    """Train a model; writes a run directory with checkpoints, metrics.jsonl and final.json.
    Started by torchrun (torchrun --nproc_per_node=N -m xmlsparse train ...), N processes train one
    run together: the head sharded by labels, the rest data-parallel."""
    from xmlsparse.parallel.world import leave_world, peers_failures_named, world_from_env

    world = world_from_env()
    with peers_failures_named(world):
        _train(config, set_, out, overwrite, resume, device, world)
        leave_world(world)


def _train(config: Path | None, set_: list[str], out: Path | None, overwrite: bool, resume: Path | None,
           device: str | None, world: World) -> None:
    """``train``'s work, as one process of ``world``."""
    from xmlsparse.config import load_config
    from xmlsparse.train.trainer import RunFinished, resume_run, start_run

    if device is not None and device not in ("cpu", "cuda", "auto"):
        raise XMLSparseError(f"--device {device!r}: expected cpu, cuda or auto")
    if resume is not None:
        _check_resume_arguments(resume, config, out, overwrite)
        check_output_dir(resume)
        try:
            trainer = resume_run(resume, device, _resume_epochs(set_), world)
        except RunFinished as finished:
            if world.is_main:
                typer.echo(str(finished))
            return
    else:
        if config is None:
            raise XMLSparseError("give a CONFIG to start a run, or --resume RUN_DIR to continue one")
        overrides = list(set_) + ([f"train.device={device}"] if device else [])
        cfg = load_config(config, overrides)
        run_dir = out if out is not None else Path("runs") / config.stem
        check_output_dir(run_dir)
        trainer = start_run(cfg, run_dir, overwrite=overwrite, world=world)
    final = trainer.fit()
    if final is None:
        raise typer.Exit(130)
    if world.is_main:
        typer.echo(f"test metrics of the best checkpoint ({trainer.run_dir / 'final.json'}):")
        _print_metrics(final["test"])


def _check_resume_arguments(resume: Path, config: Path | None, out: Path | None, overwrite: bool) -> None:
    """Refuse what --resume would otherwise ignore: the run's own config.yaml and directory are the truth."""
    if config is not None:
        raise XMLSparseError(
            f"CONFIG {config} with --resume {resume}: a resumed run keeps its own {resume / 'config.yaml'}; "
            f"leave out CONFIG (a changed config is a new run: xmlsparse train {config} --out NEW_DIR)"
        )
    if out is not None:
        raise XMLSparseError(f"--out {out} with --resume {resume}: a resumed run stays in its own directory")
    if overwrite:
        raise XMLSparseError(
            f"--overwrite with --resume {resume}: a resumed run continues its directory, it replaces nothing"
        )


def _resume_epochs(overrides: list[str]) -> int | None:
    """The epochs of ``--set train.epochs=N`` given with --resume (None without it); any other key
    is refused, since the run's own config.yaml is what it continues with."""
    from xmlsparse.config import apply_overrides

    epochs = None
    for item in overrides:
        values = apply_overrides({}, [item])
        train = values.get("train")
        if list(values) != ["train"] or not isinstance(train, dict) or list(train) != ["epochs"]:
            raise XMLSparseError(
                f"--set {item} with --resume: a resumed run keeps its own config.yaml; only train.epochs=N "
                "(more epochs than the run's) may be set"
            )
        value = train["epochs"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise XMLSparseError(f"--set {item}: expected train.epochs=N, N a positive whole number of epochs")
        epochs = value
    return epochs


@app.command(name="eval")
@one_line_errors
def eval_command(
    run_dir: Optional[Path] = typer.Argument(None, help="A run directory written by `xmlsparse train`."),
    split: str = typer.Option("test", help="test or val (with RUN_DIR)."),
    k: str = typer.Option("1,3,5", help="Comma-separated k values."),
    save_predictions: bool = typer.Option(
        False, "--save-predictions", help="Write the top-k predictions into RUN_DIR.",
    ),
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
    """Evaluate a run directory, or score a prediction file against a data set.

    A second table splits P@k and PSP@k by the labels' training frequency (head, torso, tail)."""
    from xmlsparse.atomic import write_json
    from xmlsparse.evaluate import evaluate_predictions_file
    from xmlsparse.metrics import DEFAULT_BUCKETS
    from xmlsparse.runs import evaluate_run_dir, saved_predictions_path

    ks = _parse_ks(k)
    n_buckets = DEFAULT_BUCKETS if buckets is None else buckets
    if json_out is not None:
        check_output_file(json_out)
    if predictions is not None:
        if run_dir is not None:
            raise XMLSparseError("give either RUN_DIR or --predictions with --truth, not both")
        if truth is None:
            raise XMLSparseError("--predictions needs --truth TEST (the data set the predictions are for)")
        if buckets is not None and buckets > 0 and train_data is None:
            raise XMLSparseError(f"--buckets {buckets} needs --train TRAIN (the training label frequencies)")
        metrics, table = evaluate_predictions_file(predictions, truth, ks, train_data, a, b, n_buckets)
    elif run_dir is not None:
        if split not in ("test", "val"):
            raise XMLSparseError(f"--split {split!r}: expected test or val")
        metrics, table = evaluate_run_dir(run_dir, split, ks, save_predictions, n_buckets)
    else:
        raise XMLSparseError("give a RUN_DIR, or --predictions PRED --truth TEST")
    _print_metrics(metrics)
    if table is not None:
        typer.echo("")
        _print_frequency_table(table)
    if json_out is not None:
        write_json(json_out, metrics if table is None else {**metrics, "by_frequency": table})
    if save_predictions and run_dir is not None:
        typer.echo(f"predictions written to {saved_predictions_path(run_dir, split)}")


@app.command()
@one_line_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `xmlsparse train`."),
    input_path: Path = typer.Argument(..., metavar="INPUT", help="XC text or npz features (dense: .npy)."),
    top_k: int = typer.Option(5, help="Labels per point."),
    out: Optional[Path] = typer.Option(None, help="Output: .npz (CSR scores) or text label:score lines."),
) -> None:
    """Write the top-k labels of every point of INPUT."""
    from xmlsparse.runs import predict_file

    written = predict_file(run_dir, input_path, top_k, out)
    if written.top_k < top_k:
        typer.echo(f"--top-k {top_k} is more than the model's {written.top_k} labels: wrote {written.top_k} per point",
                   err=True)
    typer.echo(f"predictions written to {written.path}")


@app.command()
@one_line_errors
def ensemble(
    members: list[Path] = typer.Argument(..., metavar="RUN_DIR...", help="Two or more run directories of the same data."),
    out: Path = typer.Option(..., help="The ensemble directory to write (eval and predict read it as a run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
    buckets: int = typer.Option(3, help="Label-frequency buckets of the test table (0: none)."),
) -> None:
    """Score finished runs as one model, the mean of their logits: seeds or losses of one recipe.

    The runs must share the data section of their configs (so also the validation points) and
    their stored preprocessing. Writes --out with the validation and test metrics in final.json."""
    from xmlsparse.ensembles import create_ensemble
    from xmlsparse.evaluate import check_buckets

    check_buckets(buckets)
    final = create_ensemble(members, out, overwrite, buckets)
    for index, member_test in enumerate(final["members_test"]):
        if member_test is not None and "P@1" in member_test:
            typer.echo(f"member {index}: test P@1 {100 * member_test['P@1']:.2f}  ({final['members'][index]})")
    typer.echo(f"ensemble of {len(final['members'])}, test metrics ({out / 'final.json'}):")
    _print_metrics(final["test"])
    if "test_by_frequency" in final:
        typer.echo("")
        _print_frequency_table(final["test_by_frequency"])


@app.command("tune")
@one_line_errors
def tune_command(
    config: Path = typer.Argument(..., help="YAML config; its train.early_stopping.metric is maximised."),
    trials: int = typer.Option(..., help="Trials to run in this call (a study already in --out continues)."),
    timeout: Optional[float] = typer.Option(None, help="Start no new trial after this many seconds."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="<key=value>", help="Override a key in every trial: --set train.epochs=10 (repeatable).",
    ),
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
    check_output_dir(out)
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


@app.command()
@one_line_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `xmlsparse train` (finished or not)."),
    out: Optional[Path] = typer.Option(None, help="Folder for report.png and report.html (default: RUN_DIR)."),
) -> None:
    """Draw a run's training curves into report.png and show them in report.html.

    The figure also holds the test P@k by training label frequency and the memory by part; the page
    adds the run's config and final metrics as tables. A run without final.json gets its curves."""
    from xmlsparse.report import write_report

    png, page = write_report(run_dir, out)
    typer.echo(f"report written to {page} (figure: {png})")


def main() -> None:
    app(prog_name="xmlsparse")


if __name__ == "__main__":
    sys.exit(main())
