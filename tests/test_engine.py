"""The compiled engine: fixed batch shapes without retracing, normalised output, verification, real faces."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.conftest import FACERES_SAVEDMODEL, face_paths, needs_shared
from worker.inference.engine import Engine


def roc_auc(genuine: list[float], impostor: list[float]) -> float:
    """Probability that a random genuine pair is closer than a random impostor pair (ties count half)."""
    g = np.asarray(genuine)[:, None]
    i = np.asarray(impostor)[None, :]
    return float((g < i).mean() + 0.5 * (g == i).mean())


def pair_distances(embeddings: np.ndarray, people: list[str]) -> tuple[list[float], list[float]]:
    genuine, impostor = [], []
    for a, b in itertools.combinations(range(len(people)), 2):
        d = 1.0 - float(embeddings[a] @ embeddings[b])
        (genuine if people[a] == people[b] else impostor).append(d)
    return genuine, impostor


def test_odd_batches_never_retrace_after_warm_up(engine):
    warm = engine.trace_count
    assert warm == 1 and len(engine.allowed_batch_sizes) == 5  # one trace serves every batch size
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 7, 9, 13, 17, 33):  # 17 and 33 exceed max_batch_size 16: run in chunks
        out = engine.embed(rng.uniform(0, 255, (n, 112, 112, 3)).astype(np.float32))
        assert out.shape == (n, 512) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert engine.trace_count == warm


def test_padding_a_batch_does_not_change_its_embeddings(engine):
    x = np.random.default_rng(1).uniform(0, 255, (3, 112, 112, 3)).astype(np.float32)
    together = engine.embed(x)  # runs at padded size 4
    alone = np.concatenate([engine.embed(x[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_verify_uses_cosine_distance_and_threshold(engine):
    a, b = engine.embed_images([p.read_bytes() for p in face_paths()[:2]])
    v = engine.verify(a, b)
    assert v.distance == pytest.approx(1.0 - float(a @ b), abs=1e-7)
    assert v.threshold == 0.68 and v.similar == (v.distance <= 0.68)
    assert engine.verify(a, a, threshold=1e-6).similar  # distance ~0 (float32 norm rounding)
    assert engine.verify(a, b, threshold=v.distance - 1e-6).similar is False


def test_random_init_arcface_runs_end_to_end_on_real_faces(engine):
    with ThreadPoolExecutor(2) as pool:
        emb = engine.embed_images([p.read_bytes() for p in face_paths()], pool=pool)
    assert emb.shape == (40, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_reduced_precision_stays_close_to_float32(arcface_h5, engine):
    from worker.inference.model import load_face_model

    bf16 = Engine(load_face_model(arcface_h5, precision="mixed_bfloat16"), (1, 8))
    images = [p.read_bytes() for p in face_paths()[::5]]
    low, full = bf16.embed_images(images), engine.embed_images(images)
    cosine = np.sum(low * full, axis=1)
    print(f"bf16 vs fp32 cosine min {cosine.min():.5f}")
    assert cosine.min() >= 0.99


@needs_shared(FACERES_SAVEDMODEL)
def test_real_face_model_puts_same_person_pairs_closer(capsys):
    from worker.inference.model import load_face_model

    model = load_face_model(FACERES_SAVEDMODEL, name="faceres", scale=1.0, offset=0.0, threshold=0.45)
    engine = Engine(model, (8, 40))
    assert (model.input_size, model.embedding_dim) == (224, 1024)
    paths = face_paths()
    emb = engine.embed_images([p.read_bytes() for p in paths])
    genuine, impostor = pair_distances(emb, [p.parent.name for p in paths])
    auc = roc_auc(genuine, impostor)
    with capsys.disabled():
        print(
            f"\nfaceres on 40 real crops: ROC AUC {auc:.4f}; mean distance same {np.mean(genuine):.3f}, "
            f"different {np.mean(impostor):.3f}"
        )
    assert len(genuine) == 80 and len(impostor) == 700
    assert auc >= 0.98
    assert np.mean(genuine) < np.mean(impostor) - 0.15
