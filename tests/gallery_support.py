"""What the gallery tests share: random unit embeddings near each other or not, waiting for another worker to
see a change, a store's top subjects. Their fixtures are in :mod:`tests.gallery_fixtures`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from producer.contract.requests import ImageRef
from tests.patience import patience
from worker.gallery import GalleryStore

DIM = 64
IMG = ImageRef(path="x.png")


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(rng: np.random.Generator, v: np.ndarray, noise: float) -> np.ndarray:
    """Unit vectors near the rows of ``v``: noise of norm about ``noise`` (cosine distance about noise**2 / 2)."""
    w = v + (noise / np.sqrt(v.shape[1])) * rng.normal(size=v.shape).astype(np.float32)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def wait_until(predicate, timeout: float = patience(1.0)) -> float:
    """Seconds until ``predicate()`` held; fails the test past ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not visible within {timeout}s")
        time.sleep(0.002)
    return time.monotonic() - start


def top_subjects(store: GalleryStore, gallery: str, q: np.ndarray, k: int = 5, threshold: float = 2.0) -> list[str]:
    return [m.subject for m in store.identify(gallery, q[None], k, threshold)[0]]
