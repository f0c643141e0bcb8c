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
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from producer.bulk.evaluation import Summary
from producer.bulk.jobs import EmbedJobs
from producer.bulk.output import (
    BulkError,
    Progress,
    check_output_path,
    summary_from_output,
)
from producer.bulk.pairs import Pair, PairFile
from producer.client.face_client import FaceClient
from producer.contract.defaults import DEFAULT_BULK_WINDOW, DEFAULT_THRESHOLD
from producer.contract.metric import cosine_distance
from producer.contract.results import decode_embedding, encode_embedding

COLUMNS = ["a", "b", "label", "distance", "similar", "error", "message"]


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
    window: int = DEFAULT_BULK_WINDOW  # embed jobs in flight
    chunk: int = 64  # images per enqueue_many
    images_per_job: int = 64  # images of one embed_batch job (1: one embed job per image)
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
    workers of the queue publish for their model (``arcface:model:<queue>``), else ArcFace's default."""
    if given is not None:
        return given, "--threshold"
    info = client.model_info()
    t = info.get("threshold") if info else None
    if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t):
        return float(t), f"the workers' model {info.get('model', '?') if info else '?'}"
    return (
        DEFAULT_THRESHOLD,
        f"the ArcFace default: no worker has published its model on queue {client.settings.queue!r} yet",
    )


class Sidecar:
    """Embeddings and queued job ids by image key, appended to ``<out>.embeddings.jsonl`` as they happen."""

    def __init__(self, path: Path, params: dict[str, Any]) -> None:
        self.path = path
        self.vectors: dict[str, np.ndarray] = {}
        self.jobs: dict[str, str] = {}  # image key -> job id of an earlier run, not yet collected
        # image key -> (code, message); never persisted: retried next run
        self.errors: dict[str, tuple[str, str]] = {}
        self.model: tuple[str, str] | None = None  # (model, an image it embedded): every embedding's must agree
        found_params = self._load(path) if path.exists() else None
        if found_params is not None and found_params != params:
            changed = sorted(k for k in set(params) | set(found_params) if params.get(k) != found_params.get(k))
            raise BulkError(
                f"{path} was made with other settings ({', '.join(changed)}: {[found_params.get(k) for k in changed]} "
                f"then, {[params.get(k) for k in changed]} now): use another --out, or delete it to start over"
            )
        self._out = path.open("a")
        if found_params is None:
            self._write({"params": params})

    def _load(self, path: Path) -> dict[str, Any] | None:
        """Read an earlier run's lines; returns the parameters it was made with."""
        found_params: dict[str, Any] | None = None
        with path.open() as f:
            for line in f:
                try:
                    obj = json.loads(line)
                    if "params" in obj:
                        found_params = obj["params"]
                    elif "embedding_b64" in obj:
                        self.vectors[obj["image"]] = decode_embedding(obj["embedding_b64"])
                        self.jobs.pop(obj["image"], None)
                        if isinstance(obj.get("model"), str):
                            self._check_model(obj["image"], obj["model"])
                    elif "job_id" in obj:
                        self.jobs[obj["image"]] = obj["job_id"]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run
        return found_params

    def _write(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    def queued(self, pairs: list[tuple[str, str]]) -> None:
        for key, job_id in pairs:
            self._out.write(json.dumps({"image": key, "job_id": job_id}) + "\n")
        self._out.flush()

    def add(self, key: str, vector: np.ndarray, model: str) -> None:
        """Keep ``key``'s embedding, made by ``model`` (``name (dim-d)``); :class:`BulkError` when an earlier
        embedding of the run (or of the sidecar) was made by another model."""
        self._check_model(key, model)
        self.vectors[key] = vector
        self._write({"image": key, "embedding_b64": encode_embedding(vector), "model": model})

    def _check_model(self, key: str, model: str) -> None:
        if self.model is None:
            self.model = (model, key)
            return
        first, example = self.model
        if model != first:
            raise BulkError(
                f"stopped: two models answered this run's embed jobs: {first} (e.g. {example}) and {model} "
                f"(e.g. {key}); distances between their embeddings mean nothing. Serve one model per queue "
                f"(ARCFACE_QUEUE), then rerun with a new --out (or delete {self.path} to start this one over)"
            )

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

    def run(self) -> BulkStats:
        """Embed every unique image, write every pair's row in file order; returns the run's stats.
        :class:`BulkInterrupted` on Ctrl-C (the rows so far stay, queued jobs are in the sidecar).
        :class:`~producer.bulk.output.BulkError` when two models answer the run's jobs (their distances mean
        nothing together), or when its first :data:`~producer.bulk.jobs.EARLY_FAILURES` images all fail for
        one reason (a wrong ``--root``)."""
        start = time.monotonic()
        total = self.pairs.validate()  # broken lines are reported before anything is enqueued
        side = Sidecar(self.sidecar_path, self._params())
        jobs = EmbedJobs(self.client, self.options, side, self.stats)
        try:
            with self.out.open("w", newline="") as f:
                rows = _Rows(self, f, side, jobs, total)
                for pair in self.pairs:
                    rows.add(pair)
                jobs.submit(force=True)
                while jobs.order:
                    jobs.collect_oldest()
                    rows.flush()
                rows.flush()
        except KeyboardInterrupt:
            self.stats.seconds = time.monotonic() - start
            raise BulkInterrupted(self.stats, list(jobs.in_flight.values()), self.sidecar_path) from None
        finally:
            self.stats.images_failed = len(side.errors)
            side.close()
        self.stats.seconds = time.monotonic() - start
        return self.stats


class _Rows:
    """The results CSV of a run: pairs wait (at most ``max_pending_pairs``) until both embeddings are in,
    then are written in file order."""

    def __init__(self, run: BulkRun, f: IO[str], side: Sidecar, jobs: EmbedJobs, total: int) -> None:
        self.run, self.f, self.side, self.jobs, self.total = run, f, side, jobs, total
        self.stats, self.options = run.stats, run.options
        self.writer = csv.writer(f)
        self.writer.writerow(COLUMNS)
        self.pending: deque[Pair] = deque()

    def add(self, pair: Pair) -> None:
        """Start the pair's images, then collect results while the window or the pending pairs are full."""
        jobs = self.jobs
        jobs.start(pair.a)
        jobs.start(pair.b)
        self.pending.append(pair)
        jobs.submit()
        while len(jobs.in_flight) + len(jobs.to_submit) >= self.options.window or (
            len(self.pending) > self.options.max_pending_pairs
        ):
            if not jobs.order:
                jobs.submit(force=True)
                if not jobs.order:
                    break
            jobs.collect_oldest()
            self.flush()
        self.flush()

    def flush(self) -> None:
        """Write every leading pending pair whose two images are done."""
        side = self.side
        while self.pending and side.known(self.pending[0].a) and side.known(self.pending[0].b):
            pair = self.pending.popleft()
            self._write(pair, cached=pair.a not in self.jobs.fresh and pair.b not in self.jobs.fresh)
            self.f.flush()
            if self.run.on_progress:
                self.run.on_progress(self.stats, self.total)

    def _write(self, pair: Pair, cached: bool) -> None:
        side = self.side
        failed = [(which, key, side.errors[key]) for which, key in (("a", pair.a), ("b", pair.b)) if key in side.errors]
        label = "" if pair.label is None else ("1" if pair.label else "0")
        self.stats.rows += 1
        self.stats.rows_cached += cached
        if failed:
            self.stats.failed += 1
            message = "; ".join(f"image {which} {key}: {err[1]}" for which, key, err in failed)
            self.writer.writerow([pair.a, pair.b, label, "", "", failed[0][2][0], message])
            return
        d = cosine_distance(side.vectors[pair.a], side.vectors[pair.b])
        self.writer.writerow([pair.a, pair.b, label, f"{d:.6f}", "1" if d <= self.options.threshold else "0", "", ""])


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


__all__ = [
    "COLUMNS",
    "BulkInterrupted",
    "BulkOptions",
    "BulkRun",
    "BulkStats",
    "resolve_threshold",
    "run_bulk",
]
