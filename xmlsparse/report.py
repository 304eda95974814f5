"""A run directory as a picture and a page: training curves, P@k by label frequency, memory by part.

``write_report`` reads ``metrics.jsonl`` (one record per validated epoch), ``final.json`` (written
when training ends; absent for a run that was interrupted or is still going, whose report then
shows its curves alone) and ``config.yaml``, and writes ``report.png`` and ``report.html``, a page
that shows the picture above the config and the final metrics as tables.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so that making a report
neither needs a display nor changes the backend of a program that imports this module.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation

from xmlsparse.atomic import atomic_write
from xmlsparse.errors import XMLSparseError
from xmlsparse.outputs import check_output_dir
from xmlsparse.runs import check_run_dir
from xmlsparse.train.trainer import read_metrics

PNG_NAME = "report.png"
HTML_NAME = "report.html"

# Bars of the frequency panel: P@k in full colour, PSP@k in the same colour, lighter and hatched.
_K_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
# Entries of final.json's "memory" that are not parts: the sum of all parts, and the optimizer's
# share that the optimizer_<part> entries already split by part.
_MEMORY_TOTALS = ("total", "optimizer_state")


@dataclass
class RunFiles:
    """What a run directory holds: its config, its epoch records and, once training ended, its
    final metrics (None before)."""

    run_dir: Path
    config: dict[str, Any]
    records: list[dict[str, Any]]
    final: dict[str, Any] | None


def read_run(run_dir: Path) -> RunFiles:
    """The config, ``metrics.jsonl`` records and ``final.json`` of ``run_dir``; a last line that a
    kill cut short is skipped, as a resume skips it."""
    config = yaml.safe_load(check_run_dir(run_dir).read_text()) or {}
    records = read_metrics(run_dir / "metrics.jsonl")
    final_path = run_dir / "final.json"
    try:
        final = json.loads(final_path.read_text()) if final_path.is_file() else None
    except json.JSONDecodeError as error:
        raise XMLSparseError(f"{final_path}: not JSON ({error})") from None
    return RunFiles(run_dir, config, records, final)


def _ks(keys: Any, prefix: str) -> list[int]:
    """The k of every key ``<prefix>@<k>``, ascending."""
    suffixes = (key[len(prefix) + 1 :] for key in keys if key.startswith(f"{prefix}@"))
    return sorted(int(k) for k in suffixes if k.isdigit())


def _summary_k(ks: list[int]) -> int:
    """The k of the single nDCG and PSP curves: 5 when evaluated, else the largest k."""
    return 5 if 5 in ks else max(ks)


def _byte_unit(largest: float) -> tuple[float, str]:
    """The unit to write byte counts up to ``largest`` in, and its size in bytes."""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return scale, unit
    return 1, "bytes"


def _empty(ax: Axes, title: str, message: str) -> None:
    """A panel with nothing to draw: its title and why, without axes."""
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes, color="0.4")
    ax.set_axis_off()


def _curve(
    ax: Axes, records: list[dict[str, Any]], key: str, label: str | None = None, scale: float = 1.0, **style: Any
) -> bool:
    """Plot ``scale`` times ``key`` of each record that has it against the epoch; False when none has it."""
    points = [(r["epoch"], scale * r[key]) for r in records if r.get(key) is not None]
    if not points:
        return False
    epochs, values = zip(*points)
    ax.plot(epochs, values, marker="o", markersize=3, label=label, **style)
    return True


def _epoch_axes(ax: Axes, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # Epochs are whole numbers: no tick at 2.5.
    ax.xaxis.get_major_locator().set_params(integer=True)


class _PlainLogFormatter(LogFormatterSciNotation):
    """Log-axis tick labels as plain numbers (0.06 rather than 6 x 10^-2), on the ticks that
    matplotlib chooses to label."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:.3g}" if super().__call__(x, pos) else ""


def _plot_loss(ax: Axes, records: list[dict[str, Any]]) -> None:
    _curve(ax, records, "loss", color="tab:blue")
    if all(r.get("loss", 1.0) > 0 for r in records):
        # The first epoch's loss is often ten times the last ones'; a log scale keeps both readable.
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLogFormatter())
        ax.yaxis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))
    _epoch_axes(ax, "training loss", "mean loss over the epoch")


def _plot_validation(ax: Axes, records: list[dict[str, Any]]) -> None:
    keys = {key[len("val_"):] for r in records for key in r if key.startswith("val_")}
    p_ks = _ks(keys, "P")
    for index, k in enumerate(p_ks):
        _curve(ax, records, f"val_P@{k}", f"P@{k}", 100, color=_K_COLOURS[index % len(_K_COLOURS)])
    for family, style in (("nDCG", "--"), ("PSP", ":")):
        ks = _ks(keys, family)
        if ks:
            k = _summary_k(ks)
            _curve(ax, records, f"val_{family}@{k}", f"{family}@{k}", 100, color="0.3", linestyle=style)
    _epoch_axes(ax, "validation metrics", "%")
    ax.legend(fontsize="small", ncol=2)


def _plot_lr(ax: Axes, records: list[dict[str, Any]]) -> None:
    _curve(ax, records, "lr", color="tab:purple")
    _epoch_axes(ax, "learning rate (at the epoch's end)", "learning rate")
    # Each tick written out (3e-03), not as a shared offset above the axis that the title covers.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))


def _plot_rewired(ax: Axes, records: list[dict[str, Any]]) -> None:
    if not _curve(ax, records, "rewired_fraction", color="tab:green"):
        _empty(ax, "rewired connections", "not logged by this run")
        return
    _epoch_axes(ax, "rewired connections", "fraction of connections, summed\nover the epoch's rewirings")
    ax.set_ylim(bottom=0)


def _plot_throughput(ax: Axes, records: list[dict[str, Any]]) -> None:
    _curve(ax, records, "samples_per_second", color="tab:brown")
    _epoch_axes(ax, "training throughput (steps only)", "samples / s")
    ax.set_ylim(bottom=0)


def _plot_epoch_time(ax: Axes, records: list[dict[str, Any]]) -> None:
    # Older runs log the steps' time as epoch_seconds alone.
    step_key = "step_seconds" if any("step_seconds" in r for r in records) else "epoch_seconds"
    _curve(ax, records, "epoch_wall_seconds", "whole epoch (wall clock)", color="tab:red")
    _curve(ax, records, step_key, "training steps", color="tab:blue")
    _epoch_axes(ax, "epoch time", "seconds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")


def _plot_frequency(ax: Axes, rows: list[dict[str, Any]] | None) -> None:
    title = "test P@k and PSP@k by training label frequency"
    if not rows:
        _empty(ax, title, "no test evaluation in final.json")
        return
    columns = [key for key in rows[0] if key.startswith(("P@", "PSP@"))]
    p_ks = _ks(columns, "P")
    width = 0.8 / len(columns)
    for index, key in enumerate(columns):
        family, k = key.split("@")
        colour = _K_COLOURS[p_ks.index(int(k)) % len(_K_COLOURS)] if int(k) in p_ks else "0.5"
        psp = family == "PSP"
        offsets = [i - 0.4 + (index + 0.5) * width for i in range(len(rows))]
        ax.bar(offsets, [100 * row[key] for row in rows], width, label=key, color=colour,
               alpha=0.45 if psp else 1.0, hatch="//" if psp else None, edgecolor="white" if not psp else colour)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([
        f"{row['bucket']}\n{row['labels']:,} labels\ntrain freq {row['freq_min']:,}-{row['freq_max']:,}"
        if row["labels"] else f"{row['bucket']}\nno labels"
        for row in rows
    ], fontsize="small")
    ax.set_title(title)
    ax.set_ylabel("% (the buckets sum to the overall value)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=2)


def _plot_memory(ax: Axes, final: dict[str, Any] | None) -> None:
    title = "memory by part"
    memory = (final or {}).get("memory")
    if not memory:
        _empty(ax, title, "no memory report in final.json")
        return
    bars = [(part, size, "tab:blue") for part, size in memory.items()
            if isinstance(size, (int, float)) and part not in _MEMORY_TOTALS and size > 0]
    # CUDA runs also measure one step: the bytes at its start and each phase's peak above that.
    bars += [(f"step: {phase}", size, "tab:orange") for phase, size in (memory.get("step") or {}).items() if size > 0]
    if not bars:
        _empty(ax, title, "every part is empty")
        return
    scale, unit = _byte_unit(max(size for _, size, _ in bars))
    names, sizes, colours = zip(*reversed(bars))  # the first part on top
    ax.barh(names, [size / scale for size in sizes], color=colours)
    for y, size in enumerate(sizes):
        ax.text(size / scale, y, f" {size / scale:,.2f}", va="center", fontsize="small")
    ax.margins(x=0.2)
    notes = []
    total = memory.get("total")
    if isinstance(total, (int, float)):
        notes.append(f"state {total / scale:,.2f} {unit} in all")
    peak = final.get("peak_memory_bytes")
    if isinstance(peak, (int, float)) and peak > 0:
        peak_scale, peak_unit = _byte_unit(peak)
        where = "process" if final.get("device") == "cpu" else "device"
        notes.append(f"{where} peak {peak / peak_scale:,.2f} {peak_unit}")
    ax.set_title(title + (f" ({'; '.join(notes)})" if notes else ""))
    ax.set_xlabel(unit)
    ax.tick_params(axis="y", labelsize="small")
    ax.grid(axis="x", alpha=0.3)


def _figure_title(run: RunFiles) -> str:
    final = run.final or {}
    # final.json names the data set; before it exists, the last part of the config's path stands in.
    dataset = final.get("dataset") or Path(str((run.config.get("data") or {}).get("dataset", "?"))).name
    parts = [f"{run.run_dir.resolve().name}: {dataset}"]
    if run.final is None:
        parts.append(f"{len(run.records)} epochs logged, no final.json (interrupted or still training)")
    else:
        steps = final.get("steps")
        steps_text = f"{steps:,}" if isinstance(steps, int) else "?"
        parts.append(f"{final.get('epochs', '?')} epochs, {steps_text} steps on {final.get('device', '?')}")
        for metric, value in (final.get("best_validation") or {}).items():
            parts.append(f"best validation {metric} {100 * value:.2f}")
        if "test" in final:
            ks = _ks(final["test"], "P")
            parts.append("test " + "  ".join(f"P@{k} {100 * final['test'][f'P@{k}']:.2f}" for k in ks))
    return "  |  ".join(parts)


def plot_run(run: RunFiles) -> Figure:
    """The report's figure: six panels of curves by epoch, then P@k by label frequency and memory by part."""
    figure = Figure(figsize=(16, 13.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3, 6)
    curve_axes = [figure.add_subplot(grid[row, 2 * col : 2 * col + 2]) for row in range(2) for col in range(3)]
    panels = (_plot_loss, _plot_validation, _plot_lr, _plot_rewired, _plot_throughput, _plot_epoch_time)
    for ax, panel in zip(curve_axes, panels):
        if run.records:
            panel(ax, run.records)
        else:
            _empty(ax, panel.__name__.removeprefix("_plot_").replace("_", " "), "no epoch has ended yet")
    _plot_frequency(figure.add_subplot(grid[2, :3]), (run.final or {}).get("test_by_frequency"))
    _plot_memory(figure.add_subplot(grid[2, 3:]), run.final)
    figure.suptitle(_figure_title(run), fontsize="large")
    return figure


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as (dotted key, leaf value) rows, in order."""
    if isinstance(value, dict) and value:
        rows = []
        for key, inner in value.items():
            rows += _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return rows
    return [(prefix, value)]


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned."""
    def cell(tag: str, value: Any, index: int) -> str:
        align = ' class="num"' if index >= numeric_from else ""
        return f"<{tag}{align}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", name, i) for i, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", value, i) for i, value in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metrics_table(metrics: dict[str, float]) -> str:
    """Metric families as rows, k as columns, values x100 (as ``xmlsparse train`` prints them)."""
    families: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        name, _, k = key.partition("@")
        if k.isdigit():
            families.setdefault(name, {})[int(k)] = value
    ks = sorted({k for row in families.values() for k in row})
    rows = [[name] + [f"{100 * row[k]:.2f}" if k in row else "" for k in ks] for name, row in families.items()]
    return _table(["metric"] + [f"@{k}" for k in ks], rows)


def _frequency_table(rows: list[dict[str, Any]]) -> str:
    columns = [key for key in rows[0] if key.startswith(("P@", "PSP@", "R@"))]
    body = [
        [row["bucket"], f"{row['labels']:,}", f"{row['freq_min']:,}-{row['freq_max']:,}" if row["labels"] else "-"]
        + [f"{100 * row[key]:.2f}" for key in columns]
        for row in rows
    ]
    return _table(["bucket", "labels", "train freq"] + columns, body)


def _memory_table(memory: dict[str, Any]) -> str:
    rows = [[part, f"{size:,}"] for part, size in memory.items() if isinstance(size, (int, float))]
    rows += [[f"step: {phase}", f"{size:,}"] for phase, size in (memory.get("step") or {}).items()]
    return _table(["part", "bytes"], rows)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f2f2f2; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #a33; }
"""


def render_html(run: RunFiles, png_name: str = PNG_NAME) -> str:
    """The report page: the figure ``png_name`` (beside the page), the final metrics and the config."""
    title = f"xmlsparse run {run.run_dir.resolve().name}"
    sections = [f"<h1>{html.escape(title)}</h1>", f'<img src="{html.escape(png_name)}" alt="training curves">']
    final = run.final
    if final is None:
        last = run.records[-1] if run.records else None
        sections.append(
            f'<p class="note">No final.json: the run was interrupted or is still training; '
            f"{len(run.records)} epochs logged so far.</p>"
        )
        if last is not None:
            validation = {key[len("val_"):]: value for key, value in last.items() if key.startswith("val_")}
            sections += [f"<h2>Validation metrics of epoch {last['epoch']}</h2>", _metrics_table(validation)]
    else:
        summary = [[key, f"{value:,}" if isinstance(value, int) else value]
                   for key, value in final.items() if not isinstance(value, (dict, list))]
        summary += [[f"best validation {metric}", f"{100 * value:.2f}"]
                    for metric, value in (final.get("best_validation") or {}).items()]
        sections += ["<h2>Final</h2>", _table(["entry", "value"], summary, numeric_from=2)]
        if "test" in final:
            sections += ["<h2>Test metrics of the best checkpoint (x100)</h2>", _metrics_table(final["test"])]
        if final.get("test_by_frequency"):
            sections += ["<h2>Test metrics by training label frequency (x100)</h2>",
                         _frequency_table(final["test_by_frequency"])]
        if final.get("memory"):
            sections += ["<h2>Memory by part</h2>", _memory_table(final["memory"])]
    config_rows = [[key, json.dumps(value) if isinstance(value, (list, dict)) or value is None else value]
                   for key, value in _flatten(run.config)]
    sections += ["<h2>Config</h2>", _table(["key", "value"], config_rows, numeric_from=2)]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` of ``run_dir`` into ``out`` (default: ``run_dir``);
    returns their paths. Each file appears complete or not at all."""
    out = run_dir if out is None else out
    run = read_run(run_dir)
    check_output_dir(out)
    figure = plot_run(run)
    out.mkdir(parents=True, exist_ok=True)
    png, page = out / PNG_NAME, out / HTML_NAME
    with atomic_write(png, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    with atomic_write(page, "w") as handle:
        handle.write(render_html(run))
    return png, page
