"""Executing: the images of registered jobs go to preprocessing (processes or threads) and into the scheduler; an
engine batch the scheduler packs goes through the detector and the engine once; a job whose last image is embedded
is completed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from producer.contract.codes import ErrorCode, JobFailure
from producer.contract.requests import ImageRef
from producer.contract.wire import request_images
from worker.batching.completion import Completer
from worker.batching.reading import Taken
from worker.batching.scheduler import Scheduler
from worker.inference.prepool import ProcessPreprocessor
from worker.inference.preprocess import PreparedImage
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics
    from worker.runtime import Runtime


log = structlog.get_logger("arcface.batcher")


class Item:
    """One image of a job on its way through preprocessing and the engine."""

    __slots__ = ("taken", "index", "future")

    def __init__(self, taken: Taken, index: int, future: Future[PreparedImage]) -> None:
        self.taken, self.index, self.future = taken, index, future


class Executor:
    """Preprocessing submissions and engine batches; owns the preprocessing threads (and, once started, the
    preprocessing processes)."""

    def __init__(
        self,
        runtime: Runtime,
        settings: WorkerSettings,
        metrics: WorkerMetrics | None,
        scheduler: Scheduler[Item],
        completer: Completer,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.scheduler = scheduler
        self.completer = completer
        self.threads = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self.procs: ProcessPreprocessor | None = None  # started by the worker's loop
        self.batches_done = 0

    def close(self) -> None:
        """Stop the preprocessing threads and processes (after the last batch)."""
        self.threads.shutdown(wait=True)
        if self.procs is not None:
            self.procs.close()

    def preprocess(self, jobs: list[Taken]) -> None:
        """Start the preprocessing of registered jobs' images: in the preprocessing processes where there are, in
        one submit so that chunks span jobs; images for the detector (and every image without processes) on
        threads. A job whose images cannot even be submitted (a bug, never bad input: that fails in preprocessing)
        fails alone with ``internal_error`` rather than staying registered and heartbeated forever."""
        to_processes: list[tuple[Taken, int, ImageRef]] = []
        broken: list[tuple[Taken, Exception]] = []
        for t in jobs:
            if t.n_images == 0:
                continue
            try:
                to_processes.extend(self._submit_job(t))
            except Exception as err:
                broken.append((t, err))
        if to_processes:
            try:
                if self.procs is None:
                    raise RuntimeError("images bound for preprocessing processes, but none are running")
                futures = self.procs.submit([(ref.data_b64, ref.path) for _, _, ref in to_processes])
            except Exception as err:
                broken.extend((t, err) for t in {id(t): t for t, _, _ in to_processes}.values())
            else:
                self.scheduler.add(Item(t, i, f) for (t, i, _), f in zip(to_processes, futures, strict=True))
        for t, cause in broken:
            log.error("submit_crashed", job_id=t.id, error=f"{type(cause).__name__}: {str(cause)[:300]}")
            t.remaining = 0
            failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"preprocessing could not start: {type(cause).__name__}")
            self.completer.complete([self.completer.failure_outcome(t, failure)], [t])

    def _submit_job(self, t: Taken) -> list[tuple[Taken, int, ImageRef]]:
        """Queue one job's images on the threads; returns those bound for the processes instead."""
        assert t.request is not None
        refs = request_images(t.request)
        if not all(isinstance(ref, ImageRef) for ref in refs):
            raise TypeError(f"{type(t.request).__name__} lists a non-image among its images")
        t.embeddings = None
        t.faces = [None] * t.n_images
        if self.procs is not None and not t.detect:
            return [(t, i, ref) for i, ref in enumerate(refs)]
        all_faces = getattr(t.request, "faces", "one") == "all"
        self.scheduler.add(
            Item(t, i, self.threads.submit(self.runtime.prepare_image, ref, t.detect, all_faces))
            for i, ref in enumerate(refs)
        )
        return []

    def run_batch(self, items: list[Item]) -> None:
        """Run one engine batch; a bug anywhere in it fails the batch's unfinished jobs (``internal_error``) rather
        than leaving them registered and heartbeated forever, and never stops the worker."""
        try:
            self._run_batch(items)
        except Exception as exc:
            log.exception("batch_crashed", images=len(items))
            jobs = list({id(item.taken): item.taken for item in items if item.taken.remaining > 0}.values())
            failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"the batch failed: {type(exc).__name__}: {exc}")
            for t in jobs:
                t.remaining = 0
            self.completer.complete([self.completer.failure_outcome(t, failure) for t in jobs], jobs)

    def _run_batch(self, items: list[Item]) -> None:
        """Wait for the images' preprocessing, run detection and the engine once, complete finished jobs."""
        t0 = time.perf_counter()
        images = [self._prepared(item) for item in items]
        try:
            alive = [k for k, im in enumerate(images) if im.input is not None or im.raw is not None]
            alive, detect_ms = self._detect(items, images, alive)
            t1 = time.perf_counter()
            inference_ms = self._embed(items, images, alive) if alive else 0.0
        finally:
            for im in images:
                if im.release is not None:
                    im.release()  # a preprocessing process's slot: the batch has its copy
        done: list[Taken] = []
        for item in items:
            t = item.taken
            t.remaining -= 1
            t.batch_size = len(items)
            t.inference_ms += inference_ms / len(items)
            t.detect_ms += detect_ms / len(items)
            if t.remaining == 0:
                done.append(t)
        t2 = time.perf_counter()
        outcomes = [self.completer.finish(t) for t in done]
        self.completer.complete(outcomes, done, working_s=t2 - t0)
        t3 = time.perf_counter()
        self.batches_done += 1
        failed = sum(1 for o in outcomes if o.kind == "failed")
        if self.metrics is not None:
            self.metrics.observe_batch(
                len(items), len(alive), t1 - t0 - detect_ms / 1000.0, detect_ms / 1000.0, inference_ms / 1000.0, t3 - t2
            )
        log.info(
            "batch",
            images=len(items),
            jobs=len(done),
            failed=failed,
            preprocess_ms=round((t1 - t0) * 1000.0 - detect_ms, 1),
            detect_ms=round(detect_ms, 1),
            inference_ms=round(inference_ms, 1),
            write_ms=round((t3 - t2) * 1000.0, 1),
            queue_wait_ms=round(max((t.queued_ms for t in done), default=0.0), 1),
        )
        log.debug("batch_jobs", job_ids=[t.id for t in done])

    def _detect(self, items: list[Item], images: list[PreparedImage], alive: list[int]) -> tuple[list[int], float]:
        """One detector call for the images waiting for it; returns the images still alive and the ms spent."""
        if not any(images[k].raw is not None for k in alive):
            return alive, 0.0
        try:
            found, detect_ms = self.runtime.detect_images([images[k] for k in alive])
        except Exception as exc:
            log.exception("detection_crashed", images=len(alive))
            failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"detection failed: {type(exc).__name__}: {exc}")
            found, detect_ms = dict.fromkeys(range(len(alive)), failure), 0.0
        for j, failure in found.items():
            items[alive[j]].taken.item_failures[items[alive[j]].index] = failure
        return [k for j, k in enumerate(alive) if j not in found], detect_ms

    def _embed(self, items: list[Item], images: list[PreparedImage], alive: list[int]) -> float:
        """One engine call for the alive images (and the extra faces of ``faces="all"``); returns the ms spent."""
        extra = [(k, x, f) for k in alive for x, f in (images[k].extra or [])]
        inputs: list[Any] = [images[k].input for k in alive] + [x for _, x, _ in extra]
        try:
            emb, inference_ms = self.runtime.embed_inputs(inputs)
        except Exception as exc:
            log.exception("inference_crashed", images=len(alive))
            for k in alive:
                failure = JobFailure(ErrorCode.INTERNAL_ERROR, f"inference failed: {type(exc).__name__}: {exc}")
                items[k].taken.item_failures[items[k].index] = failure
            return 0.0
        for k, row in zip(alive, emb[: len(alive)], strict=True):
            self._store(items[k], row, images[k])
        for (k, _, f), row in zip(extra, emb[len(alive) :], strict=True):
            items[k].taken.extra_faces.append((f, row))
        return inference_ms

    def _prepared(self, item: Item) -> PreparedImage:
        t = item.taken
        try:
            im = item.future.result(timeout=self.settings.decode_timeout_s)
            t.preprocess_ms += im.ms
            return im
        except JobFailure as failure:
            t.item_failures[item.index] = failure
        except FutureTimeout:
            if not item.future.cancel() and item.future.done() and item.future.exception() is None:
                release = item.future.result().release  # it came in just now: free its slot
                if release is not None:
                    release()
            # (cancelled: a process pool's image that arrives later frees its slot at once)
            t.item_failures[item.index] = JobFailure(
                ErrorCode.IMAGE_DECODE_ERROR,
                f"image took over {self.settings.decode_timeout_s:g}s to decode (ARCFACE_DECODE_TIMEOUT_S)",
            )
        except Exception as exc:  # a bug, not bad input: fail this image, keep the worker
            log.exception("prepare_crashed", job_id=t.id)
            t.item_failures[item.index] = JobFailure(
                ErrorCode.INTERNAL_ERROR, f"preprocessing crashed: {type(exc).__name__}: {exc}"
            )
        return PreparedImage()

    def _store(self, item: Item, row: np.ndarray, image: PreparedImage) -> None:
        t = item.taken
        if t.embeddings is None:
            t.embeddings = np.zeros((t.n_images, row.shape[0]), np.float32)
        t.embeddings[item.index] = row
        t.faces[item.index] = image.face
