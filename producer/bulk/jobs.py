"""The embed jobs of a bulk run: each unique image embedded once, reused from the run's sidecar, resumed from a job
an interrupted run left queued, or enqueued in chunks, one ``enqueue_many`` per chunk; images go in ``embed_batch``
jobs of ``images_per_job`` (rows recorded as ``<job id>#<row>``) or, with 1, one embed job each."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.bulk.output import BulkError
from producer.client.face_client import FaceClient
from producer.contract.codes import ErrorCode, JobError
from producer.contract.errors import InputError, JobFailed, JobNotFound, ResultTimeout
from producer.contract.requests import EmbedBatchRequest, EmbedRequest

if TYPE_CHECKING:
    from producer.bulk.run import BulkOptions, BulkStats, Sidecar

EARLY_FAILURES = 20
"""A run stops (:class:`BulkError`) when its first this-many images all fail for the same reason: a wrong
``--root``, a shared root the workers do not have, a pair file of paths from elsewhere."""


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
        self.first: list[str] = []  # the run's first EARLY_FAILURES image keys, in the order they appear
        self.first_decided = False  # one of them was embedded (or they failed for several reasons): no early stop

    def start(self, key: str) -> None:
        """The first time ``key`` appears in this run: reuse, resume or enqueue its embedding."""
        if key in self.seen:
            return
        self.seen.add(key)
        if len(self.first) < EARLY_FAILURES:
            self.first.append(key)
        if key in self.side.vectors:  # from the sidecar of an earlier run
            self.stats.images_reused += 1
            self.first_decided = True
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
            self.stop_if_the_first_all_failed()

    def _path_of(self, key: str) -> str:
        o = self.options
        return key if o.shared_root else str((o.root / key) if o.root else Path(key))

    def _reason(self, key: str) -> tuple[str, str]:
        """The failure of ``key`` without the image's own name: the same reason reads the same for every image."""
        code, message = self.side.errors[key]
        return code, message.replace(self._path_of(key), "").replace(key, "")

    def stop_if_the_first_all_failed(self) -> None:
        """:class:`BulkError` once the run's first :data:`EARLY_FAILURES` images have all failed, for one reason."""
        if self.first_decided or len(self.first) < EARLY_FAILURES:
            return
        if any(k in self.side.vectors for k in self.first):
            self.first_decided = True
            return
        if not all(k in self.side.errors for k in self.first):
            return  # some still in flight
        self.first_decided = True
        if len({self._reason(k) for k in self.first}) == 1:
            code, message = self.side.errors[self.first[0]]
            raise BulkError(
                f"stopped early: the first {EARLY_FAILURES} images all failed with {code} for the same reason, "
                f"e.g. {message}. Check --root (images are read relative to it) or, with --shared-root, the "
                "workers' ARCFACE_SHARED_ROOT, and the paths of the pair file; then rerun"
            )

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

    def _embedding(self, ref: str) -> tuple[Any, str]:
        """The embedding a job reference stands for, and the model that made it (``name (dim-d)``): an embed
        job's, or one row of an embed_batch job's (the batch's result is read once and kept until its last row is
        taken)."""
        jid, _, row = ref.partition("#")
        if not row:
            one = self.client.result_embed(jid, timeout=self.options.job_timeout_s)
            return one.embedding, model_label(one.model, one.dim)
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
        return value.embeddings[int(row)], model_label(value.model, value.dim)

    def collect_oldest(self) -> None:
        """Wait for the oldest job's embedding; a failure is recorded (an earlier run's job is retried)."""
        key = self.order.popleft()
        jid = self.in_flight.pop(key)
        earlier = key in self.resumed
        self.resumed.discard(key)
        try:
            vector, model = self._embedding(jid)
            self.side.add(key, vector, model)
            if key in self.first:
                self.first_decided = True
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
        self.stop_if_the_first_all_failed()


def model_label(model: str, dim: int) -> str:
    """How a bulk run names the model of an embedding: ``arcface (512-d)``."""
    return f"{model} ({dim}-d)"
