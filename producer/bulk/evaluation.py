"""Verification metrics from labelled distances: accuracy at a threshold, best threshold, ROC AUC,
TAR at fixed FAR, and LFW's 10-fold protocol. Pure numpy; a smaller distance means "same person"."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np


def accuracy(distances: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Share of pairs classified right by ``distance <= threshold``."""
    return float(np.mean((distances <= threshold) == labels)) if len(labels) else float("nan")


def best_threshold(distances: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy; candidates are the distances themselves (and just
    below the smallest), ties broken towards the smaller threshold."""
    order = np.sort(np.unique(distances))
    candidates = np.concatenate([[order[0] - 1e-6], order]) if len(order) else np.array([0.0])
    accs = np.array([accuracy(distances, labels, t) for t in candidates])
    i = int(np.argmax(accs))
    return float(candidates[i]), float(accs[i])


def roc_auc(distances: np.ndarray, labels: np.ndarray) -> float:
    """P(a genuine pair is closer than an impostor pair), ties counting half (Mann-Whitney U)."""
    g, i = distances[labels], distances[~labels]
    if not len(g) or not len(i):
        return float("nan")
    ranks = _average_ranks(np.concatenate([g, i]))
    # AUC of "smaller distance = genuine": count impostors above each genuine
    u = ranks[len(g) :].sum() - len(i) * (len(i) + 1) / 2.0  # impostor ranks above genuine ones
    return float(u / (len(g) * len(i)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def tar_at_far(distances: np.ndarray, labels: np.ndarray, far: float) -> float | None:
    """True-accept rate at the threshold whose false-accept rate is at most ``far``; None when there are
    fewer than ``1/far`` impostor pairs (the figure would mean nothing)."""
    impostor = np.sort(distances[~labels])
    genuine = distances[labels]
    if len(impostor) < int(round(1.0 / far)) or not len(genuine):
        return None
    allowed = int(np.floor(far * len(impostor)))  # impostors we may accept
    threshold = impostor[allowed] - 1e-12 if allowed < len(impostor) else np.inf  # strictly below the next one
    return float(np.mean(genuine <= threshold))


def ten_fold(distances: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> tuple[float, float, list[float]]:
    """LFW protocol: for each fold, the best threshold on the other folds, accuracy on it. (mean, std, accs)."""
    accs = []
    for k in sorted(set(folds.tolist())):
        train, test = folds != k, folds == k
        t, _ = best_threshold(distances[train], labels[train])
        accs.append(accuracy(distances[test], labels[test], t))
    return float(np.mean(accs)), float(np.std(accs)), accs


@dataclass
class Summary:
    pairs: int
    failed: int
    threshold: float
    labelled: int = 0
    accuracy: float | None = None
    best_threshold: float | None = None
    best_accuracy: float | None = None
    roc_auc: float | None = None
    tar_at_far_1e3: float | None = None
    tar_at_far_1e2: float | None = None
    ten_fold_accuracy_mean: float | None = None
    ten_fold_accuracy_std: float | None = None
    ten_fold_accuracies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    distances: Sequence[float],
    labels: Sequence[bool | None],
    folds: Sequence[int | None],
    threshold: float,
    pairs: int,
    failed: int,
) -> Summary:
    """All metrics over the pairs that have both a distance and a label."""
    s = Summary(pairs=pairs, failed=failed, threshold=threshold)
    keep = [i for i, lab in enumerate(labels) if lab is not None]
    s.labelled = len(keep)
    if not keep:
        return s
    d = np.asarray([distances[i] for i in keep], float)
    y = np.asarray([bool(labels[i]) for i in keep])
    s.accuracy = accuracy(d, y, threshold)
    s.best_threshold, s.best_accuracy = best_threshold(d, y)
    s.roc_auc = roc_auc(d, y)
    s.tar_at_far_1e3 = tar_at_far(d, y, 1e-3)
    s.tar_at_far_1e2 = tar_at_far(d, y, 1e-2)
    f = [folds[i] for i in keep]
    if all(x is not None for x in f) and len(set(f)) >= 2:
        s.ten_fold_accuracy_mean, s.ten_fold_accuracy_std, s.ten_fold_accuracies = ten_fold(d, y, np.asarray(f))
    return s
