"""`xmlsparse report`: a PNG of the curves, P@k by label frequency and memory, and an HTML page with
the config and final metrics, for a finished run and for one without final.json."""

import json
import shutil
import struct
from pathlib import Path

from typer.testing import CliRunner

from xmlsparse.cli import app
from xmlsparse.report import plot_run, read_run

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def panel_titles(run_dir: Path) -> list[str]:
    return [ax.get_title() for ax in plot_run(read_run(run_dir)).axes]


def test_report_of_a_finished_run(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report written to {out / 'report.html'}" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.png"]
    assert not (run / "report.png").exists()
    width, height = png_size(out / "report.png")
    assert width >= 1200 and height >= 1000

    page = (out / "report.html").read_text()
    assert '<img src="report.png"' in page
    final = json.loads((run / "final.json").read_text())
    assert f"<td>P</td><td class=\"num\">{100 * final['test']['P@1']:.2f}</td>" in page
    assert "<td>model.head.fan_in</td><td>6</td>" in page
    assert "<td>head</td>" in page and "<td>optimizer_head</td>" in page
    assert "No final.json" not in page

    titles = panel_titles(run)
    assert "test P@k and PSP@k by training label frequency" in titles
    assert any(title.startswith("memory by part (state") for title in titles)


def test_report_of_an_interrupted_run_shows_its_curves(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    (run / "final.json").unlink()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "loss": 0.')  # a line that a kill cut short
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    png_size(run / "report.png")
    page = (run / "report.html").read_text()
    assert "No final.json" in page and "2 epochs logged so far" in page
    assert "Validation metrics of epoch 2" in page

    figure = plot_run(read_run(run))
    curves = {ax.get_title(): ax for ax in figure.axes}
    assert len(curves["training loss"].lines[0].get_xdata()) == 2
    assert [line.get_label() for line in curves["validation metrics"].lines] == [
        "P@1", "P@3", "P@5", "P@10", "nDCG@5", "PSP@5",
    ]
    assert "no test evaluation in final.json" in [t.get_text() for ax in figure.axes for t in ax.texts]


def test_report_of_a_run_before_its_first_epoch(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run[0] / "config.yaml", run)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "0 epochs logged so far" in (run / "report.html").read_text()


def test_report_refuses_a_folder_that_is_no_run_or_an_out_that_is_a_file(tiny_run, tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == f"error: {tmp_path}: not a run directory (config.yaml is missing)\n"
    taken = tmp_path / "taken"
    taken.write_text("")
    result = runner.invoke(app, ["report", str(tiny_run[0]), "--out", str(taken)])
    assert result.exit_code == 2
    assert result.output == f"error: output folder {taken} exists and is not a folder\n"
