"""Bulk offline verification: a pair file in, a results file and metrics out, through the same workers.

Each *unique* image is embedded once (embed jobs, enqueued in chunks with ``enqueue_many``); pair distances
are computed here, on the producer side. Pairs stream through a bounded window: at most ``window`` embed
jobs are in flight and at most ``max_pending_pairs`` pairs wait for their images, so memory holds only the
window and the embeddings of the images seen so far (2 KiB each). Rows are appended to the output as soon
as both of a pair's embeddings are in, in file order.

Resume: rerunning with the same ``--out`` skips the rows already written, and embeddings already computed
are read back from the sidecar ``<out>.embeddings.jsonl`` instead of being recomputed.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from producer.client import FaceClient, InputError, JobFailed, ResultTimeout
from producer.evaluation import Summary, summarise
from producer.jobs import EmbedRequest, ErrorCode, ImageRef, cosine_distance, decode_embedding, encode_embedding
from producer.pairs import Pair, PairFile

COLUMNS = ["a", "b", "label", "distance", "similar", "error"]


@dataclass
class BulkOptions:
    root: Path | None = None  # images are relative to this directory (inline mode)
    shared_root: bool = False  # send paths; workers read them under their ARCFACE_SHARED_ROOT
    threshold: float = 0.68
    window: int = 256  # embed jobs in flight
    chunk: int = 64  # jobs per enqueue_many
    max_pending_pairs: int = 10_000
    job_timeout_s: float = 600.0
    progress: bool = True
    detect: str | None = None  # "none" / "blazeface": override the workers' detection setting


@dataclass
class BulkStats:
    pairs: int = 0
    skipped: int = 0
    failed: int = 0
    images_embedded: int = 0
    images_reused: int = 0
    seconds: float = 0.0
    distances: list[float] = field(default_factory=list)
    labels: list[bool | None] = field(default_factory=list)
    folds: list[int | None] = field(default_factory=list)


class _Embeddings:
    """Embeddings (or error codes) by image key, persisted to the sidecar as they arrive."""

    def __init__(self, sidecar: Path) -> None:
        self.sidecar = sidecar
        self.vectors: dict[str, np.ndarray] = {}
        self.errors: dict[str, str] = {}
        if sidecar.exists():
            with sidecar.open() as f:
                for line in f:
                    try:
                        obj = json.loads(line)
                        self.vectors[obj["image"]] = decode_embedding(obj["embedding_b64"])
                    except (ValueError, KeyError):
                        continue  # a torn last line from an interrupted run
        self._out = sidecar.open("a")

    def add(self, key: str, vector: np.ndarray) -> None:
        self.vectors[key] = vector
        self._out.write(json.dumps({"image": key, "embedding_b64": encode_embedding(vector)}) + "\n")

    def fail(self, key: str, code: str) -> None:
        self.errors[key] = code  # not persisted: a rerun tries the image again

    def known(self, key: str) -> bool:
        return key in self.vectors or key in self.errors

    def close(self) -> None:
        self._out.close()


def _rows_done(out: Path) -> int:
    """Complete data rows already in ``out``; a torn last line is cut off so appending stays valid."""
    if not out.exists() or out.stat().st_size == 0:
        return 0
    data = out.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    return max(0, data.count(b"\n") - 1)  # minus the header


class BulkRun:
    """One bulk verification run (see module docstring)."""

    def __init__(self, client: FaceClient, pairs: PairFile, out: Path, options: BulkOptions,
                 on_progress: Callable[[int, int], None] | None = None) -> None:
        self.client = client
        self.pairs = pairs
        self.out = Path(out)
        self.options = options
        self.on_progress = on_progress
        self.stats = BulkStats()

    def _ref(self, key: str) -> ImageRef:
        if self.options.shared_root:
            return self.client.image_ref(key, as_path=True)
        path = (self.options.root / key) if self.options.root else Path(key)
        return self.client.image_ref(path)

    def run(self) -> BulkStats:
        start = time.monotonic()
        total = self.pairs.validate()  # broken lines are reported before anything is enqueued
        done = _rows_done(self.out)
        new_file = done == 0
        embeddings = _Embeddings(self.out.with_name(self.out.name + ".embeddings.jsonl"))
        in_flight: dict[str, str] = {}  # image key -> job id
        order: deque[str] = deque()  # keys in submission order
        to_submit: list[tuple[str, Any]] = []
        pending: deque[tuple[int, Pair]] = deque()
        with self.out.open("a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(COLUMNS)

            def submit(force: bool = False) -> None:
                while to_submit and (force or len(to_submit) >= self.options.chunk):
                    chunk, to_submit[:] = to_submit[: self.options.chunk], to_submit[self.options.chunk :]
                    ids = self.client.submit_many(req for _, req in chunk)
                    for (key, _), jid in zip(chunk, ids):
                        in_flight[key] = jid
                        order.append(key)

            def collect_oldest() -> None:
                key = order.popleft()
                jid = in_flight.pop(key)
                try:
                    embeddings.add(key, self.client.result(jid, timeout=self.options.job_timeout_s).embedding)
                    self.stats.images_embedded += 1
                except JobFailed as exc:
                    embeddings.fail(key, exc.error.code.value)
                except ResultTimeout:
                    embeddings.fail(key, ErrorCode.JOB_TIMEOUT.value)

            def flush() -> None:
                while pending:
                    index, pair = pending[0]
                    if not (embeddings.known(pair.a) and embeddings.known(pair.b)):
                        return
                    pending.popleft()
                    self._write(writer, pair, embeddings)
                if self.on_progress:
                    self.on_progress(self.stats.pairs + self.stats.skipped, total)

            seen: set[str] = set()  # image keys already handled in this run
            for index, pair in enumerate(self.pairs):
                if index < done:
                    self.stats.skipped += 1
                    continue
                for key in (pair.a, pair.b):
                    if key in seen:
                        continue
                    seen.add(key)
                    if key in embeddings.vectors:  # from the sidecar of an earlier run
                        self.stats.images_reused += 1
                        continue
                    try:
                        to_submit.append((key, EmbedRequest(image=self._ref(key), detect=self.options.detect)))  # type: ignore[arg-type]
                    except InputError as exc:
                        embeddings.fail(key, exc.code.value)
                pending.append((index, pair))
                submit()
                while len(in_flight) >= self.options.window or len(pending) > self.options.max_pending_pairs:
                    if not order:
                        submit(force=True)
                        if not order:
                            break
                    collect_oldest()
                    flush()
                flush()
            submit(force=True)
            while order:
                collect_oldest()
                flush()
            flush()
        embeddings.close()
        self.stats.seconds = time.monotonic() - start
        return self.stats

    def _write(self, writer: Any, pair: Pair, embeddings: _Embeddings) -> None:
        error = embeddings.errors.get(pair.a) or embeddings.errors.get(pair.b) or ""
        label = "" if pair.label is None else ("1" if pair.label else "0")
        self.stats.pairs += 1
        if error:
            self.stats.failed += 1
            writer.writerow([pair.a, pair.b, label, "", "", error])
            return
        d = cosine_distance(embeddings.vectors[pair.a], embeddings.vectors[pair.b])
        writer.writerow([pair.a, pair.b, label, f"{d:.6f}", "1" if d <= self.options.threshold else "0", ""])


def read_results(out: Path) -> Iterator[dict[str, str]]:
    with Path(out).open(newline="") as f:
        yield from csv.DictReader(f)


def summary_from_output(out: Path, pairs: PairFile, threshold: float) -> Summary:
    """Metrics over the whole output file (so a resumed run reports on every pair, not just the new ones)."""
    distances: list[float] = []
    labels: list[bool | None] = []
    folds: list[int | None] = []
    total = failed = 0
    for row, pair in zip(read_results(out), pairs):
        total += 1
        if row["error"]:
            failed += 1
            continue
        distances.append(float(row["distance"]))
        labels.append(pair.label)
        folds.append(pair.fold)
    return summarise(distances, labels, folds, threshold, total, failed)


def plot(out_png: Path, results: Path, threshold: float) -> None:
    """ROC curve and genuine/impostor distance histograms with the threshold marked (needs matplotlib)."""
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
    fig.savefig(out_png, dpi=100)


def progress_printer(quiet: bool) -> Callable[[int, int], None] | None:
    """A tqdm bar on stderr, unless quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(unit="pair", file=sys.stderr, smoothing=0.1)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update


def run_bulk(client: FaceClient, pairs_path: Path, out: Path, options: BulkOptions, fmt: str | None = None,
             quiet: bool = False) -> tuple[BulkStats, Summary]:
    """Run (or resume) a bulk job and return its stats and the metrics over the whole output."""
    pairs = PairFile(pairs_path, fmt)
    stats = BulkRun(client, pairs, out, options, on_progress=progress_printer(quiet or not options.progress)).run()
    return stats, summary_from_output(out, pairs, options.threshold)

