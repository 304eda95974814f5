"""Running a command in-process and reading how it failed, for the data commands' tests."""

from pathlib import Path

from typer.testing import CliRunner

from xmlsparse.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one error line of a command that failed as a user error should: exit 2, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def tree(folder: Path) -> list[str]:
    """Every path below ``folder``, relative and sorted: what a failed command must not have added."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
