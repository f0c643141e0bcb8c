"""The embed jobs of a bulk run: each unique image embedded once, reused from the run's sidecar, resumed from a job
an interrupted run left queued, or enqueued in chunks, one ``enqueue_many`` per chunk; images go in ``embed_batch``
jobs of ``images_per_job`` (rows recorded as ``<job id>#<row>``) or, with 1, one embed job each."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode, JobError
from producer.contract.errors import InputError, JobFailed, JobNotFound, ResultTimeout
from producer.contract.requests import EmbedBatchRequest, EmbedRequest

if TYPE_CHECKING:
    from producer.bulk.run import BulkOptions, BulkStats, Sidecar


class EmbedJobs:
    """The embed jobs of a run: each unique image key is reused from the sidecar, resumed from a job an
    interrupted run left queued, or enqueued (in chunks of ``options.chunk``, one ``enqueue_many`` each);
    results are collected oldest first."""

    def __init__(self, client: FaceClient, options: BulkOptions, side: Sidecar, stats: BulkStats) -> None:
        self.client, self.options, self.side, self.stats = client, options, side, stats
        self.in_flight: dict[str, str] = {}  # image key -> job id
        self.order: deque[str] = deque()  # keys in submission order
        self.resumed: set[str] = set()  # keys whose job an earlier run enqueued
        self.to_submit: list[tuple[str, EmbedRequest]] = []
        self.fresh: set[str] = set()  # keys embedded (or failed) in this run
        self.seen: set[str] = set()  # keys already handled in this run
        self.batches: dict[str, tuple[Any, int]] = {}  # embed_batch job id -> (its result or error, rows left)

    def start(self, key: str) -> None:
        """The first time ``key`` appears in this run: reuse, resume or enqueue its embedding."""
        if key in self.seen:
            return
        self.seen.add(key)
        if key in self.side.vectors:  # from the sidecar of an earlier run
            self.stats.images_reused += 1
        elif key in self.side.jobs:  # queued by an interrupted run: wait for that job
            self.in_flight[key] = self.side.jobs[key]
            self.order.append(key)
            self.resumed.add(key)
        else:
            self._enqueue(key)

    def _enqueue(self, key: str) -> None:
        o = self.options
        try:
            path = key if o.shared_root else (o.root / key) if o.root else Path(key)
            self.to_submit.append((key, self.client.embed_request(path, as_path=o.shared_root, detect=o.detect)))
        except InputError as exc:
            self.side.fail(key, exc.code.value, exc.message)
            self.fresh.add(key)

    def submit(self, force: bool = False) -> None:
        """Enqueue the waiting requests in full chunks (all of them with ``force``)."""
        size = self.options.chunk
        while self.to_submit and (force or len(self.to_submit) >= size):
            chunk, self.to_submit[:] = self.to_submit[:size], self.to_submit[size:]
            queued = self._submit_chunk(chunk)
            self.side.queued(queued)
            for key, jid in queued:
                self.in_flight[key] = jid
                self.order.append(key)

    def _submit_chunk(self, chunk: list[tuple[str, EmbedRequest]]) -> list[tuple[str, str]]:
        """Enqueue a chunk: one embed job per image, or embed_batch jobs of ``images_per_job`` images whose rows
        are recorded as ``<job id>#<row>``. Returns (image key, job reference) pairs."""
        per_job = self.options.images_per_job
        if per_job <= 1:
            ids = self.client.submit_many(req for _, req in chunk)
            return [(key, jid) for (key, _), jid in zip(chunk, ids, strict=True)]
        groups = [chunk[i : i + per_job] for i in range(0, len(chunk), per_job)]
        requests = [EmbedBatchRequest(images=[r.image for _, r in g], detect=g[0][1].detect) for g in groups]
        ids = self.client.submit_many(requests)
        return [(key, f"{jid}#{row}") for g, jid in zip(groups, ids, strict=True) for row, (key, _) in enumerate(g)]

    def _embedding(self, ref: str) -> Any:
        """The embedding a job reference stands for: an embed job's, or one row of an embed_batch job's (the
        batch's result is read once and kept until its last row is taken)."""
        jid, _, row = ref.partition("#")
        if not row:
            return self.client.result_embed(jid, timeout=self.options.job_timeout_s).embedding
        if jid not in self.batches:
            try:
                value: Any = self.client.result_embed_batch(jid, timeout=self.options.job_timeout_s)
            except (JobFailed, JobNotFound, ResultTimeout) as exc:
                value = exc
            self.batches[jid] = (value, sum(1 for r in self.in_flight.values() if r.startswith(jid + "#")) + 1)
        value, left = self.batches[jid]
        self.batches[jid] = (value, left - 1)
        if left <= 1:
            del self.batches[jid]
        if isinstance(value, Exception):
            raise value
        error = next((e for e in value.errors if e.index == int(row)), None)
        if error is not None:
            raise JobFailed(jid, JobError(code=error.code, message=error.message))
        return value.embeddings[int(row)]

    def collect_oldest(self) -> None:
        """Wait for the oldest job's embedding; a failure is recorded (an earlier run's job is retried)."""
        key = self.order.popleft()
        jid = self.in_flight.pop(key)
        earlier = key in self.resumed
        self.resumed.discard(key)
        try:
            self.side.add(key, self._embedding(jid))
            if earlier:
                self.stats.jobs_resumed += 1
            else:
                self.stats.images_embedded += 1
        except (JobFailed, JobNotFound) as exc:
            if earlier:  # an earlier run's job that failed or expired: this run tries the image again
                self._enqueue(key)
                self.submit(force=True)
                return
            code = exc.code.value if isinstance(exc, JobFailed) else ErrorCode.INTERNAL_ERROR.value
            self.side.fail(key, code, exc.error.message if isinstance(exc, JobFailed) else exc.message)
        except ResultTimeout:
            message = f"no result within {self.options.job_timeout_s:g}s (job {jid})"
            self.side.fail(key, ErrorCode.JOB_TIMEOUT.value, message)
        self.fresh.add(key)
