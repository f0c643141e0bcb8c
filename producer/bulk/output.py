"""The files around a bulk run (:mod:`producer.bulk`): checks made before anything is enqueued, the results
CSV read back, the metrics over it, the ``--plot`` figure, and the progress line on a terminal.

:mod:`producer.bulk` re-exports every name.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from producer.bulk.evaluation import Summary, summarise
from producer.bulk.pairs import PairFile
from producer.contract.errors import ArcFaceError

if TYPE_CHECKING:
    from producer.bulk.run import BulkStats


class BulkError(ArcFaceError):
    """A bulk run that cannot start (output path, plot, shared root, a sidecar from other parameters)."""

    exit_code = 2


def read_results(out: Path) -> Iterator[dict[str, str]]:
    """The rows of a bulk run's results CSV, as dicts by column name."""
    with Path(out).open(newline="") as f:
        yield from csv.DictReader(f)


def summary_from_output(out: Path, pairs: PairFile, threshold: float) -> Summary:
    """Metrics over the whole output file, which holds every pair of the file."""
    distances: list[float] = []
    labels: list[bool | None] = []
    folds: list[int | None] = []
    total = failed = 0
    for row, pair in zip(read_results(out), pairs, strict=False):  # the run writes a row per pair
        total += 1
        if row["error"]:
            failed += 1
            continue
        distances.append(float(row["distance"]))
        labels.append(pair.label)
        folds.append(pair.fold)
    return summarise(distances, labels, folds, threshold, total, failed)


def check_plot_available() -> None:
    """``--plot`` needs matplotlib: refuse before any job is enqueued, not after the run."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BulkError(
            "--plot needs matplotlib, which is not installed: pip install 'arcface-service[plot]', or drop --plot"
        )


def check_plot_file(path: Path) -> str:
    """The format ``--plot`` writes, from the file's suffix: one matplotlib can write here (tried on a small
    figure with text, so a format that needs a missing tool such as LaTeX is refused too), checked before any job
    is enqueued, not after the run."""
    import io

    check_plot_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    canvas = FigureCanvasAgg(Figure(figsize=(1, 1)))
    canvas.figure.text(0.5, 0.5, "ROC 0.5")  # text, as the plot has: the formats that typeset it need their tools
    formats = sorted(canvas.get_supported_filetypes())
    fmt = Path(path).suffix[1:].lower()
    if fmt not in formats:
        given = f"a .{fmt} file" if fmt else "a file without a suffix"
        raise BulkError(
            f"--plot {path}: matplotlib cannot write {given}; give a name ending in one of "
            f"{', '.join('.' + f for f in formats)} (.png for a picture)"
        )
    try:
        canvas.figure.savefig(io.BytesIO(), format=fmt)
    except Exception as exc:  # a backend's own failure (pgf without LaTeX, jpg without Pillow): its words
        raise BulkError(
            f"--plot {path}: matplotlib cannot write .{fmt} here ({type(exc).__name__}: {exc}); use .png, .pdf or .svg"
        ) from None
    return fmt


def check_output_path(path: Path, flag: str) -> None:
    """An output file path whose directory exists and is writable, and that is not itself a directory."""
    path = Path(path)
    if path.is_dir():
        raise BulkError(f"{flag} {path}: is a directory; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BulkError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BulkError(f"{flag} {path}: not writable")


def plot(out_png: Path, results: Path, threshold: float) -> None:
    """ROC curve and genuine/impostor distance histograms with the threshold marked (needs matplotlib), in the
    format of ``out_png``'s suffix (:func:`check_plot_file`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_results(results) if not r["error"] and r["label"] in ("0", "1")]
    d = np.array([float(r["distance"]) for r in rows])
    y = np.array([r["label"] == "1" for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    ts = np.unique(np.concatenate([[-1.0], d, [3.0]]))
    tpr = [(d[y] <= t).mean() if y.any() else 0 for t in ts]
    fpr = [(d[~y] <= t).mean() if (~y).any() else 0 for t in ts]
    ax1.plot(fpr, tpr)
    ax1.plot([0, 1], [0, 1], "--", color="grey")
    ax1.set(xlabel="false accept rate", ylabel="true accept rate", title="ROC")
    bins = np.linspace(min(d.min(initial=0), 0), max(d.max(initial=1), 1), 40)
    ax2.hist(d[y], bins=bins, alpha=0.6, label="same person")
    ax2.hist(d[~y], bins=bins, alpha=0.6, label="different people")
    ax2.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold}")
    ax2.set(xlabel="cosine distance", ylabel="pairs", title="distances")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100, format=Path(out_png).suffix[1:].lower() or None)
    plt.close(fig)


class Progress:
    """A progress line on stderr (a terminal only), redrawn per written row: rows done of total, images
    embedded, rows/s and the time left."""

    def __init__(self, stream: Any = None, min_interval_s: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._width = 0
        self._first_rows: int | None = None

    def __call__(self, stats: BulkStats, total: int) -> None:
        """Redraw the line (at most every ``min_interval_s``, and always for the last row)."""
        now = time.monotonic()
        if stats.rows < total and now - self._last < self.min_interval_s:
            return
        self._last = now
        if self._first_rows is None:
            self._first_rows = stats.rows_cached  # rows from the cache come at once: not part of the rate
        elapsed = max(now - self.start, 1e-6)
        live = stats.rows - stats.rows_cached
        rate = live / elapsed
        left = total - stats.rows
        eta = f"{left / rate:.0f}s" if rate > 0 and left else ("0s" if not left else "?")
        images = stats.images_embedded + stats.jobs_resumed
        line = (
            f"{stats.rows}/{total} rows ({100.0 * stats.rows / max(total, 1):.0f}%), {images} images embedded, "
            f"{stats.failed} failed, {rate:.1f} rows/s, ETA {eta}"
        )
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()

    def close(self) -> None:
        """End the line (if one was drawn)."""
        if self._width:
            self.stream.write("\n")
            self.stream.flush()
