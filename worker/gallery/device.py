"""A gallery's matrix on TensorFlow's device (the GPU when there is one), for 1:N search there: the product
and the top-k run in TensorFlow; the exact re-score stays in :meth:`worker.gallery.index.GalleryIndex.select`.
TensorFlow is imported only when a copy is made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from worker.gallery.index import GalleryIndex


class DeviceCopy:
    """A gallery's pages on TensorFlow's device (the GPU when there is one), kept in step with the host:
    changed rows are scattered into their page before a search; a page that was reallocated is uploaded again."""

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf
        self.vars: list[Any] = []

    def sync(self, index: GalleryIndex) -> None:
        """Bring the device pages in step with ``index`` (everything on first use, then its changed rows)."""
        if not index.track_dirty:  # first use: everything is new
            self.vars = []
            index.track_dirty = True
        dirty = np.fromiter(sorted(index.dirty), np.int64, len(index.dirty))
        index.dirty.clear()
        page_of, offset = np.divmod(dirty, index.page_rows)
        del self.vars[len(index.pages) :]
        for k, page in enumerate(index.pages):
            if k >= len(self.vars) or int(self.vars[k].shape[0]) != len(page):
                var = self.tf.Variable(page, trainable=False)
                if k < len(self.vars):
                    self.vars[k] = var
                else:
                    self.vars.append(var)
                continue
            sel = offset[page_of == k]
            if sel.size:
                self.vars[k].scatter_nd_update(sel[:, None], page[sel])

    def candidates(self, index: GalleryIndex, queries: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``kk`` best-scoring rows of ``index`` per query, as :meth:`GalleryIndex.candidates` (no floor)."""
        tf = self.tf
        self.sync(index)
        q = tf.constant(queries, dtype=self.vars[0].dtype)
        scores = tf.concat([tf.matmul(q, v, transpose_b=True) for v in self.vars], axis=1)[:, : index.n]
        values, idx = tf.math.top_k(tf.cast(scores, tf.float32), k=kk, sorted=False)
        return values.numpy(), idx.numpy().astype(np.int64)


def tf_gpu_available() -> bool:
    """True when TensorFlow is importable and sees a GPU."""
    try:
        import tensorflow as tf
    except ImportError:
        return False
    return bool(tf.config.list_physical_devices("GPU"))
