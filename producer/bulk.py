"""Bulk offline verification: a pair file in, a results file and metrics out, through the same workers.

Each *unique* image is embedded once (embed jobs, enqueued in chunks with ``enqueue_many``); pair distances
are computed here, on the producer side. Pairs stream through a bounded window: at most ``window`` embed
jobs are in flight and at most ``max_pending_pairs`` pairs wait for their images, so memory holds only the
window and the embeddings of the images seen so far (2 KiB each). Rows are written to the output as soon
as both of a pair's embeddings are in, in file order.

The sidecar ``<out>.embeddings.jsonl`` is the run's memory, appended and flushed line by line: the run's
parameters, each embed job's id when it is enqueued, and each embedding when it arrives. Every run writes
the whole CSV again from it, so a rerun with the same ``--out``:

- recomputes nothing already embedded (its rows are written at once, with the run's threshold, so the
  ``similar`` column always agrees with the summary);
- reuses the jobs an interrupted run left queued (their results are read, not enqueued again, while
  Redis keeps them: ``ARCFACE_RESULT_TTL``);
- retries the images that failed (failures are not cached), so failed rows get another chance.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from producer.client import FaceClient
from producer.errors import ArcFaceError, InputError, JobFailed, JobNotFound, ResultTimeout
from producer.evaluation import Summary, summarise
from producer.jobs import EmbedRequest, ErrorCode, cosine_distance, decode_embedding, encode_embedding
from producer.pairs import Pair, PairFile

COLUMNS = ["a", "b", "label", "distance", "similar", "error", "message"]
DEFAULT_THRESHOLD = 0.68  # ArcFace's; used only when neither --threshold nor a worker's published model gives one


class BulkError(ArcFaceError):
    """A bulk run that cannot start (output path, plot, shared root, a sidecar from other parameters)."""

    exit_code = 2


class BulkInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: the rows written so far stay, the queued jobs are recorded in the sidecar."""

    def __init__(self, stats: "BulkStats", pending_job_ids: list[str], sidecar: Path) -> None:
        super().__init__("bulk run interrupted")
        self.stats = stats
        self.pending_job_ids = pending_job_ids
        self.sidecar = sidecar


@dataclass
class BulkOptions:
    root: Path | None = None  # images are relative to this directory (inline mode)
    shared_root: bool = False  # send paths; workers read them under their ARCFACE_SHARED_ROOT
    threshold: float = DEFAULT_THRESHOLD
    window: int = 256  # embed jobs in flight
    chunk: int = 64  # jobs per enqueue_many
    max_pending_pairs: int = 10_000
    job_timeout_s: float = 600.0
    progress: bool = True
    detect: str | None = None  # "none" / "blazeface": override the workers' detection setting


@dataclass
class BulkStats:
    rows: int = 0  # rows written (every pair of the file)
    rows_cached: int = 0  # rows whose images were all embedded by an earlier run
    failed: int = 0
    images_embedded: int = 0  # embed jobs of this run that finished
    images_reused: int = 0  # embeddings read back from the sidecar
    jobs_resumed: int = 0  # jobs an interrupted run had queued, whose results this run read
    images_failed: int = 0
    seconds: float = 0.0

    @property
    def pairs(self) -> int:
        """Rows written (the name earlier versions used)."""
        return self.rows


def resolve_threshold(client: FaceClient, given: float | None) -> tuple[float, str]:
    """The verify threshold of a bulk run and where it came from: ``--threshold``, else the default the
    workers of the queue publish for their model (``arcface:model:<queue>``), else 0.68."""
    if given is not None:
        return given, "--threshold"
    info = client.model_info()
    t = info.get("threshold") if info else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t), f"the workers' model {info.get('model', '?')}"  # type: ignore[union-attr]
    return (
        DEFAULT_THRESHOLD,
        f"the ArcFace default: no worker has published its model on queue {client.settings.queue!r} yet",
    )


class _Sidecar:
    """Embeddings and queued job ids by image key, appended to ``<out>.embeddings.jsonl`` as they happen."""

    def __init__(self, path: Path, params: dict[str, Any]) -> None:
        self.path = path
        self.vectors: dict[str, np.ndarray] = {}
        self.jobs: dict[str, str] = {}  # image key -> job id of an earlier run, not yet collected
        self.errors: dict[str, tuple[str, str]] = {}  # image key -> (code, message); never persisted: retried next run
        found_params: dict[str, Any] | None = None
        if path.exists():
            with path.open() as f:
                for line in f:
                    try:
                        obj = json.loads(line)
                        if "params" in obj:
                            found_params = obj["params"]
                        elif "embedding_b64" in obj:
                            self.vectors[obj["image"]] = decode_embedding(obj["embedding_b64"])
                            self.jobs.pop(obj["image"], None)
                        elif "job_id" in obj:
                            self.jobs[obj["image"]] = obj["job_id"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line from an interrupted run
        if found_params is not None and found_params != params:
            changed = sorted(k for k in set(params) | set(found_params) if params.get(k) != found_params.get(k))
            raise BulkError(
                f"{path} was made with other settings ({', '.join(changed)}: {[found_params.get(k) for k in changed]} "
                f"then, {[params.get(k) for k in changed]} now): use another --out, or delete it to start over"
            )
        self._out = path.open("a")
        if found_params is None:
            self._write({"params": params})

    def _write(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    def queued(self, pairs: list[tuple[str, str]]) -> None:
        for key, job_id in pairs:
            self._out.write(json.dumps({"image": key, "job_id": job_id}) + "\n")
        self._out.flush()

    def add(self, key: str, vector: np.ndarray) -> None:
        self.vectors[key] = vector
        self._write({"image": key, "embedding_b64": encode_embedding(vector)})

    def fail(self, key: str, code: str, message: str) -> None:
        self.errors[key] = (code, message)

    def known(self, key: str) -> bool:
        return key in self.vectors or key in self.errors

    def close(self) -> None:
        self._out.close()


class BulkRun:
    """One bulk verification run (see module docstring)."""

    def __init__(
        self,
        client: FaceClient,
        pairs: PairFile,
        out: Path,
        options: BulkOptions,
        on_progress: Callable[[BulkStats, int], None] | None = None,
    ) -> None:
        self.client = client
        self.pairs = pairs
        self.out = Path(out)
        self.options = options
        self.on_progress = on_progress
        self.stats = BulkStats()
        self.sidecar_path = self.out.with_name(self.out.name + ".embeddings.jsonl")

    def _params(self) -> dict[str, Any]:
        o = self.options
        return {
            "queue": self.client.settings.queue,
            "shared_root": o.shared_root,
            "detect": o.detect,
            "root": None if o.shared_root else str(Path(o.root).resolve()) if o.root else None,
        }

    def _request(self, key: str) -> EmbedRequest:
        if self.options.shared_root:
            return self.client._embed_request(key, None, None, True, self.options.detect)
        path = (self.options.root / key) if self.options.root else Path(key)
        return self.client._embed_request(path, None, None, False, self.options.detect)

    def run(self) -> BulkStats:
        start = time.monotonic()
        total = self.pairs.validate()  # broken lines are reported before anything is enqueued
        side = _Sidecar(self.sidecar_path, self._params())
        in_flight: dict[str, str] = {}  # image key -> job id
        order: deque[str] = deque()  # keys in submission order
        resumed: set[str] = set()  # keys whose job an earlier run enqueued
        to_submit: list[tuple[str, EmbedRequest]] = []
        pending: deque[Pair] = deque()
        fresh: set[str] = set()  # keys embedded (or failed) in this run
        try:
            with self.out.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(COLUMNS)

                def submit(force: bool = False) -> None:
                    while to_submit and (force or len(to_submit) >= self.options.chunk):
                        chunk, to_submit[:] = to_submit[: self.options.chunk], to_submit[self.options.chunk :]
                        ids = self.client.submit_many(req for _, req in chunk)
                        side.queued([(key, jid) for (key, _), jid in zip(chunk, ids)])
                        for (key, _), jid in zip(chunk, ids):
                            in_flight[key] = jid
                            order.append(key)

                def enqueue(key: str) -> None:
                    try:
                        to_submit.append((key, self._request(key)))
                    except InputError as exc:
                        side.fail(key, exc.code.value, exc.message)
                        fresh.add(key)

                def collect_oldest() -> None:
                    key = order.popleft()
                    jid = in_flight.pop(key)
                    earlier = key in resumed
                    resumed.discard(key)
                    try:
                        side.add(key, self.client.result_embed(jid, timeout=self.options.job_timeout_s).embedding)
                        if earlier:
                            self.stats.jobs_resumed += 1
                        else:
                            self.stats.images_embedded += 1
                    except (JobFailed, JobNotFound) as exc:
                        if earlier:  # an earlier run's job that failed or expired: this run tries the image again
                            enqueue(key)
                            submit(force=True)
                            return
                        code = exc.code.value if isinstance(exc, JobFailed) else ErrorCode.INTERNAL_ERROR.value
                        side.fail(key, code, exc.error.message if isinstance(exc, JobFailed) else exc.message)
                    except ResultTimeout:
                        side.fail(
                            key,
                            ErrorCode.JOB_TIMEOUT.value,
                            f"no result within {self.options.job_timeout_s:g}s (job {jid})",
                        )
                    fresh.add(key)

                def flush() -> None:
                    while pending and side.known(pending[0].a) and side.known(pending[0].b):
                        pair = pending.popleft()
                        self._write(writer, pair, side, cached=pair.a not in fresh and pair.b not in fresh)
                        f.flush()
                        if self.on_progress:
                            self.on_progress(self.stats, total)

                seen: set[str] = set()  # image keys already handled in this run
                for pair in self.pairs:
                    for key in (pair.a, pair.b):
                        if key in seen:
                            continue
                        seen.add(key)
                        if key in side.vectors:  # from the sidecar of an earlier run
                            self.stats.images_reused += 1
                        elif key in side.jobs:  # queued by an interrupted run: wait for that job
                            in_flight[key] = side.jobs[key]
                            order.append(key)
                            resumed.add(key)
                        else:
                            enqueue(key)
                    pending.append(pair)
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
        except KeyboardInterrupt:
            self.stats.seconds = time.monotonic() - start
            raise BulkInterrupted(self.stats, list(in_flight.values()), self.sidecar_path) from None
        finally:
            self.stats.images_failed = len(side.errors)
            side.close()
        self.stats.seconds = time.monotonic() - start
        return self.stats

    def _write(self, writer: Any, pair: Pair, side: _Sidecar, cached: bool) -> None:
        failed = [(which, key, side.errors[key]) for which, key in (("a", pair.a), ("b", pair.b)) if key in side.errors]
        label = "" if pair.label is None else ("1" if pair.label else "0")
        self.stats.rows += 1
        self.stats.rows_cached += cached
        if failed:
            self.stats.failed += 1
            message = "; ".join(f"image {which} {key}: {err[1]}" for which, key, err in failed)
            writer.writerow([pair.a, pair.b, label, "", "", failed[0][2][0], message])
            return
        d = cosine_distance(side.vectors[pair.a], side.vectors[pair.b])
        writer.writerow([pair.a, pair.b, label, f"{d:.6f}", "1" if d <= self.options.threshold else "0", "", ""])


def read_results(out: Path) -> Iterator[dict[str, str]]:
    with Path(out).open(newline="") as f:
        yield from csv.DictReader(f)


def summary_from_output(out: Path, pairs: PairFile, threshold: float) -> Summary:
    """Metrics over the whole output file, which holds every pair of the file."""
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
        line = (
            f"{stats.rows}/{total} rows ({100.0 * stats.rows / max(total, 1):.0f}%), {stats.images_embedded + stats.jobs_resumed} images "
            f"embedded, {stats.failed} failed, {rate:.1f} rows/s, ETA {eta}"
        )
        self.stream.write("\r" + line.ljust(self._width))
        self._width = len(line)
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\n")
            self.stream.flush()


def run_bulk(
    client: FaceClient, pairs_path: Path, out: Path, options: BulkOptions, fmt: str | None = None, quiet: bool = False
) -> tuple[BulkStats, Summary]:
    """Run (or resume) a bulk job and return its stats and the metrics over the whole output."""
    if client.settings.result_ttl == 0:
        raise BulkError("a bulk run reads every embed job's result: ARCFACE_RESULT_TTL=0 keeps none; set it above 0")
    check_output_path(Path(out), "--out")
    pairs = PairFile(pairs_path, fmt)
    progress = Progress() if options.progress and not quiet and sys.stderr.isatty() else None
    try:
        stats = BulkRun(client, pairs, out, options, on_progress=progress).run()
    finally:
        if progress is not None:
            progress.close()
    return stats, summary_from_output(out, pairs, options.threshold)
