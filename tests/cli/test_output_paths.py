"""Output paths are checked before the work, OS errors end in one line, and the help reads well:
--version, help at 80 columns, what eval and predict say about their output."""

import errno
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import xmlsparse.runs
import xmlsparse.train.trainer
from xmlsparse.cli import app, os_error_line

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or starting a run fails the test: a bad output must be caught before."""
    def work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    for name in ("load_run", "load_run_model"):
        monkeypatch.setattr(xmlsparse.runs, name, work)
    monkeypatch.setattr(xmlsparse.train.trainer, "start_run", work)


@pytest.fixture
def read_only(monkeypatch):
    """Makes folders read-only. Root writes in them all the same, so for root a file creation in
    them is refused as well, the way a read-only folder refuses everyone else."""
    folders: list[Path] = []
    if os.geteuid() == 0:
        create = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if dir is not None and Path(dir).resolve() in folders:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
            return create(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_predict_into_a_missing_folder_or_onto_a_folder_fails_first(tiny_run, tmp_path, no_work):
    run, data = tiny_run
    missing = tmp_path / "nodir" / "p.txt"
    result = invoke("predict", str(run), str(data / "X.tst.npy"), "--out", str(missing))
    assert_one_error_line(result, str(missing), "does not exist")
    assert not missing.parent.exists()
    result = invoke("predict", str(run), str(data / "X.tst.npy"), "--out", str(tmp_path))
    assert_one_error_line(result, str(tmp_path), "is a folder")


def test_eval_json_into_a_missing_folder_fails_first(tiny_run, tmp_path, no_work):
    run, _ = tiny_run
    out = tmp_path / "nodir" / "m.json"
    assert_one_error_line(invoke("eval", str(run), "--json", str(out)), str(out), "does not exist")


def test_eval_save_predictions_in_a_read_only_run_fails_first(tiny_run, tmp_path, read_only, no_work):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    before = sorted(p.name for p in run.iterdir())
    read_only(run)
    result = invoke("eval", str(run), "--save-predictions")
    assert_one_error_line(result, str(run / "predictions-test.txt"), "is not writable")
    assert sorted(p.name for p in run.iterdir()) == before


def test_train_out_onto_a_file_or_in_a_read_only_folder_fails_first(tiny_run, tmp_path, read_only, no_work):
    config = tiny_run[0] / "config.yaml"
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert_one_error_line(invoke("train", str(config), "--out", str(taken)), str(taken), "exists and is not a folder")
    assert taken.read_text() == "keep me"
    locked = read_only(tmp_path / "locked")
    result = invoke("train", str(config), "--out", str(locked / "run"))
    assert_one_error_line(result, str(locked / "run"), "is not writable")
    assert not (locked / "run").exists()


def test_tune_out_onto_a_file_fails_first(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr("xmlsparse.tune.tune_config", lambda *a, **k: pytest.fail("the study started"))
    taken = tmp_path / "taken"
    taken.write_text("")
    result = invoke("tune", str(tiny_run[0] / "config.yaml"), "--trials", "1", "--out", str(taken))
    assert_one_error_line(result, str(taken), "exists and is not a folder")


def test_an_os_error_during_the_work_is_one_line(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "p.txt"

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("xmlsparse.runs.write_predictions", full_disk)
    run, data = tiny_run
    result = invoke("predict", str(run), str(data / "X.tst.npy"), "--out", str(out))
    assert result.exit_code == 1
    assert_one_error_line(result, f"{out}: {os.strerror(errno.ENOSPC)}")


def test_os_error_line_names_both_paths_of_a_rename():
    error = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "a/x", None, "b/x")
    assert os_error_line(error) == f"a/x -> b/x: {os.strerror(errno.EXDEV)}"
    assert os_error_line(OSError(errno.EPIPE, "Broken pipe")) == "Broken pipe"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"xmlsparse {importlib.metadata.version('xmlsparse')}\n"


def test_help_at_80_columns_has_no_placeholders_or_cut_names():
    group = typer.main.get_command(app)
    for name, command in [("", group), *group.commands.items()]:
        result = invoke(*([name] if name else []), "--help", env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        text = result.output
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "{" not in usage and "<bool>" not in text and "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= 80
        for param in command.params:
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("--"):
                    assert flag in text, f"{name} --help lacks {flag}"
    train_help = invoke("train", "--help", env={"COLUMNS": "80"}).output
    assert "--set 'eval.k=[1,10]'" in train_help


def test_eval_says_where_it_saved_the_predictions(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    result = invoke("eval", str(run), "--save-predictions", "--buckets", "0")
    assert result.exit_code == 0, result.output
    assert f"predictions written to {run / 'predictions-test.txt'}" in result.output
    assert (run / "predictions-test.txt").is_file()


def test_predict_caps_top_k_at_the_labels_and_says_so(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "p.txt"
    result = invoke("predict", str(run), str(data / "X.tst.npy"), "--top-k", "1000", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "--top-k 1000 is more than the model's 80 labels: wrote 80 per point" in result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "150 80"
    assert all(len(line.split()) == 80 for line in lines[1:])
