"""One gallery in memory: its embeddings as a paged matrix, the enrollment ids and subjects of the rows, and 1:N
search over it. Knows nothing of Redis (:mod:`worker.gallery.store` keeps it current).

Memory per enrollment: ``dim * 4`` bytes (float32; ``dim * 2`` with ``dtype="float16"``) for the matrix,
plus about 260-290 bytes of Python index (enrollment id, its row, the subject table). The matrix lives in
pages of 65,536 rows, so growing it never copies it (no transient double). ``bench/identify.py`` measures
memory and queries/s for 10k / 100k / 1M enrollments.

Search. ``scores = Q @ M.T`` for the batch's queries ``Q [N, D]`` against the gallery ``M [n, D]``, page by
page (scores for one page of a 32-query batch: 8 MiB), keeping per query the rows within the threshold, at
most the best ``top_k * m`` of each page (``m`` the most enrollments any subject has, which guarantees the top
``top_k`` distinct subjects are among them); those candidates are re-scored in float64 and reduced to the
best row per subject, filtered by the threshold. Reported distances are therefore ``1 - q.e`` in float64,
the same as :func:`producer.contract.metric.cosine_distance` (bit-for-bit for float32 galleries). With
``device="tf"`` (or ``"auto"`` with a GPU visible to TensorFlow) the product and the top-k run in
TensorFlow on a copy of the matrix kept on the device (:class:`worker.gallery.device.DeviceCopy`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import DTypeLike

from producer.contract.gallery_results import Match

if TYPE_CHECKING:
    from worker.gallery.device import DeviceCopy

PAGE_ROWS = 1 << 16  # rows per page of a gallery's matrix (128 MiB of 512-d float32), also the search block
F16_BLOCK_ROWS = 8192  # float16 rows converted to float32 at a time for the product (16 MiB scratch at 512-d)
_SCORE_MARGIN = 1e-4  # candidates are kept down to threshold + margin before the exact float64 re-score


class GalleryIndex:
    """One gallery's embeddings as a matrix (rows = enrollments) held in pages of :data:`PAGE_ROWS` rows, with
    the enrollment ids and subjects of the rows. Knows nothing of Redis; not thread-safe by itself
    (:class:`worker.gallery.store.GalleryStore` locks around it).

    Growing never copies the matrix: full pages stay where they are and a new page is added; only the last
    page grows (by half again, up to a full page) while the gallery is small. Removal moves the last row
    into the freed one (O(1)); rows past :attr:`n` are kept zero.
    """

    def __init__(self, name: str, model: str, dim: int, dtype: DTypeLike = np.float32, capacity: int = 0) -> None:
        self.name = name
        self.model = model
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"gallery dtype must be float32 or float16, not {self.dtype}")
        self.page_rows = PAGE_ROWS
        self.pages: list[np.ndarray] = []
        self.row_subject = np.zeros(0, np.int32)
        self.eids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.subjects: list[str] = []  # subject index -> subject
        self.subject_index: dict[str, int] = {}
        self.counts = np.zeros(0, np.int64)  # enrollments per subject index
        self.track_dirty = False  # set when a device copy must be kept in step
        self.dirty: set[int] = set()
        self._reserve(capacity)

    @property
    def n(self) -> int:
        """Enrollments held."""
        return len(self.eids)

    def __len__(self) -> int:
        return len(self.eids)

    @property
    def capacity(self) -> int:
        """Rows the pages can hold without growing."""
        return (len(self.pages) - 1) * self.page_rows + len(self.pages[-1]) if self.pages else 0

    @property
    def subject_total(self) -> int:
        """Subjects with at least one enrollment."""
        return int(np.count_nonzero(self.counts))

    def nbytes(self) -> int:
        """Bytes of the numpy arrays (the pages at their capacity and the row tables)."""
        return int(sum(p.nbytes for p in self.pages) + self.row_subject.nbytes + self.counts.nbytes)

    def _reserve(self, need: int) -> None:
        if need <= self.capacity:
            return
        P = self.page_rows
        while self.capacity < need:
            if self.pages and len(self.pages[-1]) < P:  # a small gallery: its only page grows
                last = self.pages[-1]
                size = min(P, max(need - (len(self.pages) - 1) * P, len(last) + len(last) // 2))
                page = np.zeros((size, self.dim), self.dtype)
                page[: len(last)] = last
                self.pages[-1] = page
            else:
                self.pages.append(np.zeros((min(P, max(need - len(self.pages) * P, 1024)), self.dim), self.dtype))
        rows = np.zeros(self.capacity, np.int32)
        rows[: len(self.row_subject)] = self.row_subject
        self.row_subject = rows

    def vector(self, row: int) -> np.ndarray:
        """The stored embedding of ``row`` (a view, in the gallery's dtype)."""
        page: np.ndarray = self.pages[row // self.page_rows]
        return page[row % self.page_rows]

    def vectors(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The stored embeddings of ``rows`` (a copy, in the gallery's dtype)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), self.dtype)
        page, offset = np.divmod(rows, self.page_rows)
        for k in np.unique(page):
            sel = page == k
            out[sel] = self.pages[k][offset[sel]]
        return out

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, the page's used rows)`` for every page holding rows."""
        for k, page in enumerate(self.pages):
            a = k * self.page_rows
            if a >= self.n:
                return
            yield a, page[: min(len(page), self.n - a)]

    def _write(self, row: int, vectors: np.ndarray) -> None:
        """Store ``vectors`` at rows ``row, row + 1, ...`` (across pages)."""
        done = 0
        while done < len(vectors):
            k, off = divmod(row + done, self.page_rows)
            take = min(len(vectors) - done, len(self.pages[k]) - off)
            self.pages[k][off : off + take] = vectors[done : done + take]
            done += take
        if self.track_dirty:
            self.dirty.update(range(row, row + len(vectors)))

    def _subject(self, subject: str) -> int:
        idx = self.subject_index.get(subject)
        if idx is None:
            idx = len(self.subjects)
            self.subjects.append(subject)
            self.subject_index[subject] = idx
            if idx >= len(self.counts):
                counts = np.zeros(max(16, 2 * len(self.counts)), np.int64)
                counts[: len(self.counts)] = self.counts
                self.counts = counts
        return idx

    def add(self, eid: str, subject: str, vector: np.ndarray) -> bool:
        """Store (or overwrite) one enrollment; True when it is new."""
        sidx = self._subject(subject)
        row = self.row_of.get(eid)
        if row is not None:
            old = int(self.row_subject[row])
            if old != sidx:
                self.counts[old] -= 1
                self.counts[sidx] += 1
                self.row_subject[row] = sidx
            self._write(row, np.asarray(vector).reshape(1, -1))
            return False
        row = self.n
        self._reserve(row + 1)
        self._write(row, np.asarray(vector).reshape(1, -1))
        self.row_subject[row] = sidx
        self.eids.append(eid)
        self.row_of[eid] = row
        self.counts[sidx] += 1
        return True

    def add_many(self, eids: Sequence[str], subjects: Sequence[str], vectors: np.ndarray) -> int:
        """Bulk :meth:`add` (loading); returns how many were new."""
        fresh = [i for i, e in enumerate(eids) if e not in self.row_of]
        if len({eids[i] for i in fresh}) != len(fresh):  # duplicates within the chunk: the slow path sorts them out
            return sum(self.add(e, s, v) for e, s, v in zip(eids, subjects, vectors, strict=True))
        for i in set(range(len(eids))) - set(fresh):
            self.add(eids[i], subjects[i], vectors[i])
        if fresh:
            start = self.n
            self._reserve(start + len(fresh))
            sidx = np.fromiter((self._subject(subjects[i]) for i in fresh), np.int32, len(fresh))
            self._write(start, np.asarray(vectors)[fresh])
            self.row_subject[start : start + len(fresh)] = sidx
            np.add.at(self.counts, sidx, 1)
            for k, i in enumerate(fresh):
                self.eids.append(eids[i])
                self.row_of[eids[i]] = start + k
        return len(fresh)

    def remove(self, eid: str) -> bool:
        """Delete one enrollment; False when it was not here."""
        row = self.row_of.pop(eid, None)
        if row is None:
            return False
        self.counts[self.row_subject[row]] -= 1
        last = self.n - 1
        if row != last:
            moved = self.eids[last]
            self._write(row, self.vector(last).reshape(1, -1).copy())
            self.row_subject[row] = self.row_subject[last]
            self.eids[row] = moved
            self.row_of[moved] = row
        self.eids.pop()
        self._write(last, np.zeros((1, self.dim), self.dtype))
        self.row_subject[last] = 0
        return True

    def rows_of(self, subject: str) -> np.ndarray:
        """The rows of ``subject``'s enrollments (a scan of the row table: ~1 ms per million rows)."""
        sidx = self.subject_index.get(subject)
        if sidx is None or self.counts[sidx] == 0:
            return np.empty(0, np.int64)
        return np.flatnonzero(self.row_subject[: self.n] == sidx)

    def subject_count(self, subject: str) -> int:
        """Enrollments of ``subject`` held (0 for a subject never seen)."""
        sidx = self.subject_index.get(subject)
        return 0 if sidx is None else int(self.counts[sidx])

    def max_per_subject(self) -> int:
        """The most enrollments any one subject has."""
        return int(self.counts.max()) if len(self.counts) else 0

    # --- search ------------------------------------------------------------------------------------
    def candidates(
        self, queries: np.ndarray, kk: int, floor: np.ndarray | float = -np.inf
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per query the ``kk`` best-scoring rows of every page that score at least ``floor`` (per query):
        ``(scores [N, K], rows [N, K])``, numpy; unused slots score ``-inf``.

        Scores under the floor (beyond the threshold) are dropped before any sorting: with a threshold that
        excludes most of the gallery, a page costs its product and one comparison, not a partition per query.
        """
        nq = len(queries)
        floors = np.broadcast_to(np.asarray(floor, np.float32), (nq,))[:, None]
        scratch = np.empty((min(F16_BLOCK_ROWS, self.n), self.dim), np.float32) if self.dtype != np.float32 else None
        scores, rows = [], []
        for a, page in self.blocks():
            top = _page_top(_page_scores(queries, page, scratch), floors, kk, a)
            if top is not None:
                scores.append(top[0])
                rows.append(top[1])
        if not scores:
            return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
        return np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)

    def select(
        self, query: np.ndarray, scores: np.ndarray, rows: np.ndarray, top_k: int, threshold: float
    ) -> list[Match]:
        """Exact float64 re-score of one query's candidates; the best row per subject, within ``threshold``,
        closest first, at most ``top_k``."""
        keep = scores >= (1.0 - threshold) - _SCORE_MARGIN
        rows = np.asarray(rows)[keep]
        if rows.size == 0:
            return []
        d = 1.0 - self.vectors(rows).astype(np.float64) @ query.astype(np.float64)
        order = np.lexsort((rows, d))
        out: list[Match] = []
        seen: set[int] = set()
        for j in order:
            if d[j] > threshold:
                break
            sidx = int(self.row_subject[rows[j]])
            if sidx in seen:
                continue
            seen.add(sidx)
            out.append(Match(subject=self.subjects[sidx], distance=float(d[j]), enrollment_id=self.eids[rows[j]]))
            if len(out) == top_k:
                break
        return out

    def search(
        self,
        queries: np.ndarray,
        top_k: Sequence[int] | int,
        threshold: Sequence[float] | float,
        device: DeviceCopy | None = None,
    ) -> list[list[Match]]:
        """Top-k subjects for every row of ``queries [N, D]`` (L2-normalised), one product for the batch.
        ``top_k`` and ``threshold`` may differ per query."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        ks = [top_k] * len(q) if isinstance(top_k, int) else list(top_k)
        ts = [threshold] * len(q) if isinstance(threshold, (int, float)) else list(threshold)
        if self.n == 0 or len(q) == 0:
            return [[] for _ in q]
        kk = min(self.n, max(ks) * max(1, self.max_per_subject()))
        floor = 1.0 - np.asarray(ts, np.float32) - _SCORE_MARGIN
        scores, rows = device.candidates(self, q, kk) if device is not None else self.candidates(q, kk, floor)
        return [self.select(q[i], scores[i], rows[i], ks[i], ts[i]) for i in range(len(q))]


def _page_scores(queries: np.ndarray, page: np.ndarray, scratch: np.ndarray | None) -> np.ndarray:
    """``queries @ page.T`` in float32: the batch's one product with this page. A float16 page is converted a
    slice at a time into ``scratch``, the products written side by side."""
    if scratch is None:
        return queries @ page.T
    s = np.empty((len(queries), len(page)), np.float32)
    for x in range(0, len(page), len(scratch)):
        part = page[x : x + len(scratch)]
        np.copyto(scratch[: len(part)], part)
        np.matmul(queries, scratch[: len(part)].T, out=s[:, x : x + len(part)])
    return s


def _page_top(s: np.ndarray, floor: np.ndarray, kk: int, first_row: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per query the at most ``kk`` best of one page's scores ``s [N, rows]`` that reach ``floor [N, 1]``, as
    ``(scores [N, k], rows [N, k])`` (rows counted from ``first_row``; unused slots ``-inf``); None when no
    score reaches its floor."""
    nq = len(s)
    hit = s >= floor
    per_query = np.count_nonzero(hit, axis=1)
    k = int(min(kk, per_query.max()))
    if k == 0:
        return None
    top_s = np.full((nq, k), -np.inf, np.float32)
    top_r = np.zeros((nq, k), np.int64)
    few = per_query <= k  # every hit fits: take them as they are
    qi, col = np.nonzero(hit & few[:, None])
    pos = np.arange(len(qi)) - np.searchsorted(qi, qi)  # rank of each hit within its query's row
    top_s[qi, pos] = s[qi, col]
    top_r[qi, pos] = col + first_row
    many = np.flatnonzero(~few)
    if many.size:  # more hits than kk: the kk best of those rows
        sub = s[many]
        idx = np.argpartition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k :]
        top_s[many] = np.take_along_axis(sub, idx, axis=1)
        top_r[many] = idx + first_row
    return top_s, top_r
