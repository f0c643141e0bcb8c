"""The distance every verdict uses, on both sides: cosine distance between L2-normalised embeddings."""

from __future__ import annotations

import numpy as np


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - a.b`` for L2-normalised embeddings (0 same direction, 1 orthogonal, 2 opposite)."""
    return float(1.0 - np.dot(np.asarray(a, np.float64), np.asarray(b, np.float64)))
