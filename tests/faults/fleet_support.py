"""The hostile-Redis harness of tests/faults/test_fleet_hardening.py: one long-running worker, raw job hashes written
as a non-Python (or hostile) producer would, and the invariants checked after every round."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from producer.client.face_client import FaceClient
from producer.contract.errors import JobFailed
from producer.contract.keys import EMBED_FUNC
from producer.contract.rqjob import JSONSerializer, SafeJob
from tests.conftest import REPO, face_paths
from tests.patience import patience
from tests.workers import WorkerProcess

MAX_BATCH = 16
PREPROCESS_THREADS = 2  # and as many preprocessing processes: two images decode at once either way
MAX_PIXELS = 40_000_000  # the worker's default ARCFACE_MAX_IMAGE_PIXELS, set explicitly so the formula below holds
MAX_JOB_BYTES = 64 * 1024 * 1024  # the default ARCFACE_MAX_JOB_BYTES, likewise
# Peak-RSS bound of one worker (with its preprocessing processes) beyond its steady state (model loaded, a full
# batch run), the README's formula: every decoder (thread or process) holding one image of max pixels at 4 bytes
# a pixel (decoded RGB(A) uint8) plus its 48 MiB of working memory, plus one job's data inflated to its bound.
# The model's own share is in the steady state the increase is measured from.
RSS_BOUND = PREPROCESS_THREADS * (MAX_PIXELS * 4 + 48 * 1024 * 1024) + MAX_JOB_BYTES


def rq_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def embed_data(image: bytes, instance=None) -> bytes:
    return json.dumps([EMBED_FUNC, instance, [{"kind": "embed", "image": {"data_b64": b64(image)}}], {}]).encode()


def as_bytes(job_id: str | bytes) -> bytes:
    return job_id if isinstance(job_id, bytes) else job_id.encode()


@dataclass
class Fleet:
    """The module's worker, its queue, and what every test wrote: the ground truth ``check`` compares with."""

    url: str
    queue: str
    conn: redis.Redis
    client: FaceClient
    worker: WorkerProcess
    direct: dict[Path, np.ndarray]  # embeddings computed in-process by the engine, per face
    good: dict[str, Path] = field(default_factory=dict)  # every good job written so far -> its face
    hostile: dict[str, str] = field(default_factory=dict)  # hostile job with a valid id -> expected code
    refused_ids: dict[str, str] = field(default_factory=dict)  # id rq refuses -> expected code (in no registry)
    checked: set[str] = field(default_factory=set)  # jobs whose outcome an earlier check read in detail

    # --- writing ---------------------------------------------------------------------------------
    def hash(
        self, job_id: str | bytes, data: bytes | None, extra: dict | None = None, drop: tuple[str, ...] = ()
    ) -> None:
        """A job hash as a careful non-Python producer writes it, with ``extra`` fields overriding."""
        now = rq_now()
        fields: dict = {
            "origin": self.queue,
            "status": "queued",
            "created_at": now,
            "enqueued_at": now,
            "description": "raw",
            "timeout": "180",
            "result_ttl": "3600",
            "failure_ttl": "3600",
        }
        if data is not None:
            fields["data"] = data
        fields.update(extra or {})
        for name in drop:
            fields.pop(name, None)
        self.conn.hset(b"rq:job:" + as_bytes(job_id), mapping=fields)

    def good_job(self, i: int) -> str:
        """A good job's hash (not queued yet); round-robin over 8 faces."""
        path = face_paths()[(i * 5) % 40]
        jid = f"good-{uuid.uuid4().hex}"
        self.hash(jid, embed_data(path.read_bytes()))
        self.good[jid] = path
        return jid

    def push(self, *ids: str | bytes) -> None:
        """All ids in one RPUSH (the worker sees them at once, so they share batches)."""
        self.conn.sadd("rq:queues", f"rq:queue:{self.queue}")
        self.conn.rpush(f"rq:queue:{self.queue}", *[as_bytes(i) for i in ids])

    def interleave(self, hostile: list[str | bytes]) -> list[str]:
        """Push each hostile id between two good jobs, then a last good one; returns the good ids."""
        goods = [self.good_job(0)]
        order: list[str | bytes] = [goods[0]]
        for i, jid in enumerate(hostile):
            goods.append(self.good_job(i + 1))
            order += [jid, goods[-1]]
        goods.append(self.good_job(len(hostile) + 1))
        self.push(*order, goods[-1])
        return goods

    # --- reading ---------------------------------------------------------------------------------
    def raw_outcome(self, job_id: str | bytes) -> tuple[str, str | None, list[str]]:
        """(status, error code in meta, decoded result entries' exc_string / 'ok') straight from Redis."""
        h = self.conn.hgetall(b"rq:job:" + as_bytes(job_id))
        status = h.get(b"status", b"").decode("latin-1")
        code = None
        if b"meta" in h:
            try:
                code = json.loads(h[b"meta"]).get("error", {}).get("code")
            except (ValueError, AttributeError):
                code = None
        entries = []
        for _, e in self.conn.xrange(b"rq:results:" + as_bytes(job_id)):
            if b"exc_string" in e:
                entries.append(zlib.decompress(base64.b64decode(e[b"exc_string"])).decode())
            else:
                entries.append("ok")
        return status, code, entries

    def wait_failed(self, ids: list[str | bytes], timeout: float = patience(180)) -> None:
        deadline = time.monotonic() + timeout
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            pending = [j for j in pending if self.raw_outcome(j)[0] != "failed"]
            if pending:
                assert self.worker.proc.poll() is None, self.log_tail()
                time.sleep(0.2)
        assert not pending, f"not failed after {timeout}s: {pending}\n{self.log_tail()}"

    def wait_results(self, ids: list[str], timeout: float = patience(240)) -> None:
        """Every good job's result, compared with the in-process engine's embedding of the same face."""
        for jid in ids:
            try:
                result = self.client.result(jid, timeout=timeout)
            except Exception as exc:
                raise AssertionError(f"good job {jid} did not finish: {exc}\n{self.log_tail()}") from exc
            np.testing.assert_allclose(result.embedding, self.direct[self.good[jid]], atol=1e-5)

    def log_tail(self) -> str:
        return self.worker.log_path.read_text()[-4000:]

    def batched_ids(self) -> list[str]:
        return [j for e in self.worker.events() if e.get("event") == "batch_jobs" for j in e["job_ids"]]

    # --- the invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        """Everything issue 11's Done-when asks after each hostile round (see the test module's docstring):
        registries against everything written so far, each job's own outcome for the jobs written since the
        last check, and rq's own tools."""
        self.check_registries()
        self.check_outcomes()
        self.check_rq_tools()
        self.checked |= set(self.good) | set(self.hostile) | set(self.refused_ids)

    def check_registries(self) -> None:
        conn, q = self.conn, self.queue
        assert self.worker.proc.poll() is None, f"the worker died:\n{self.log_tail()}"
        errors = [
            e
            for e in self.worker.events()
            if e.get("level") in ("error", "critical") and e.get("event") != "tensorflow_log"
        ]
        assert errors == [], errors[:3]
        assert conn.llen(f"rq:queue:{q}") == 0
        assert conn.llen(f"rq:queue:{q}:intermediate") == 0
        assert conn.zcard(f"rq:wip:{q}") == 0
        registries = dict(connection=conn, serializer=JSONSerializer, job_class=SafeJob)
        failed = set(FailedJobRegistry(q, **registries).get_job_ids())
        finished = set(FinishedJobRegistry(q, **registries).get_job_ids())
        assert failed == set(self.hostile), failed ^ set(self.hostile)
        assert finished == set(self.good), finished ^ set(self.good)

    def check_outcomes(self) -> None:
        """Every good job exactly once (one result entry, one run); every hostile job failed alone, once, with its
        code: in the hash, the result stream, and the client."""
        runs = self.batched_ids()
        for jid in self.good:
            assert runs.count(jid) == 1, (jid, runs.count(jid))
            if jid not in self.checked:
                status, _, entries = self.raw_outcome(jid)
                assert (status, entries) == ("finished", ["ok"]), (jid, status, entries)
        for jid, code in {**self.hostile, **self.refused_ids}.items():
            assert runs.count(jid) == 0
            if jid not in self.checked:
                status, meta_code, entries = self.raw_outcome(jid)
                assert (status, meta_code) == ("failed", code), (jid, status, meta_code, entries)
                assert len(entries) == 1 and f"[{code}]" in entries[0], (jid, entries)
        for jid, code in self.hostile.items():
            if jid in self.checked:
                continue
            with pytest.raises(JobFailed) as info:
                self.client.result(jid, timeout=patience(5))
            assert info.value.error.code.value == code
            job = SafeJob.fetch(jid, connection=self.conn, serializer=JSONSerializer)  # rq reads what the worker left
            assert job.get_status() == "failed" and job.meta["error"]["code"] == code

    def check_rq_tools(self) -> None:
        registries = dict(connection=self.conn, serializer=JSONSerializer, job_class=SafeJob)
        StartedJobRegistry(self.queue, **registries).cleanup()
        rq_info = [sys.executable, "-m", "rq.cli", "info", "--url", self.url]
        info = subprocess.run(rq_info, cwd=REPO, capture_output=True, text=True, timeout=patience(60))
        assert info.returncode == 0, info.stderr[-2000:]
        workers = subprocess.run(
            [*rq_info, "--only-workers", "-R"], cwd=REPO, capture_output=True, text=True, timeout=patience(60)
        )
        assert workers.returncode == 0 and "1 worker" in workers.stdout, workers.stdout + workers.stderr
