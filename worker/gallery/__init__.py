"""The worker side of enrolled identities: durable galleries in Redis, an in-memory matrix per gallery kept
current from the events stream, 1:N search as one matrix product per batch of queries, and
:func:`complete`, which turns a gallery job's embeddings into its result.

Layout and events are described in :mod:`producer.contract.gallery`. Every change (enroll, forget) is one Lua script:
the hashes and sets, the event and its sequence number are written atomically, so

* the data in Redis is the truth and survives any worker (and, with AOF, Redis restarts);
* a worker starts by reading the sequence number and the stream's last id (one MULTI), then the hashes, and
  follows the stream from that id (``XREAD BLOCK``): a change made through any worker is in every worker's
  matrix within milliseconds, well within a second; events already in the snapshot are applied again,
  harmlessly (every event is idempotent);
* a search holds the store's lock, so an event arriving during a search is applied right after it: a change
  is visible to searches that start within a second of it or one search duration, whichever is longer (a
  32-query search of 1M enrollments took ~4 s on the loaded 2-core development machine, milliseconds on a GPU);
* a sequence number other than the next one means events were lost to this worker (trimmed while it was
  disconnected, or a Redis that lost writes): it reloads everything;
* a batch with identify or verify-against-a-subject jobs first syncs with Redis (one round trip: the sequence
  number and the last applied entry; the missing events, if any): once a change's result is readable, every
  such job taken afterwards, by any worker, searches with the change applied;
* before each read of the stream (at most ``block_ms``, 0.5 s, apart) the follower checks that Redis still
  holds what the worker applied (the sequence number did not go back, the last applied entry is still there
  with its number, the galleries set exists): after ``FLUSHALL``, a restart without persistence or a deleted
  key the worker reloads, so it drops what Redis lost within about a second, with no job sent;
* every Redis call of the gallery path waits out a full, loading or unreachable Redis with the batching
  worker's backoff (:mod:`worker.batching.retry`): such a Redis delays gallery jobs, never fails them.

The rooms, each its own module (this one re-exports their public names):

* :mod:`worker.gallery.index`: one gallery in memory (the paged matrix, its row tables) and 1:N search, with
  the memory per enrollment and the search method described there;
* :mod:`worker.gallery.device`: a gallery's matrix on TensorFlow's device, for search on a GPU;
* :mod:`worker.gallery.redis_io`: the Lua scripts and the reads from Redis;
* :mod:`worker.gallery.mirror`: the galleries a worker holds in memory, loaded and kept current from the events;
* :mod:`worker.gallery.store`: :class:`GalleryStore`, that mirror plus the changes, lookups and jobs;
* :mod:`worker.gallery.jobs`: :func:`complete`, a gallery job's result.
"""

from __future__ import annotations

from producer.contract.gallery import images_for
from worker.gallery.device import DeviceCopy, tf_gpu_available
from worker.gallery.index import F16_BLOCK_ROWS, PAGE_ROWS, GalleryIndex
from worker.gallery.jobs import GalleryItem, complete
from worker.gallery.redis_io import EnrollOutcome, ForgetOutcome
from worker.gallery.store import GalleryStore, SubjectDistance

__all__ = [
    "F16_BLOCK_ROWS",
    "PAGE_ROWS",
    "DeviceCopy",
    "EnrollOutcome",
    "ForgetOutcome",
    "GalleryIndex",
    "GalleryItem",
    "GalleryStore",
    "SubjectDistance",
    "complete",
    "images_for",
    "tf_gpu_available",
]
