"""The TF.js graph-model loader on the real shared models: outputs equal the reference figures measured
with TF.js (shared/models/README.md), batches of any size, float16-quantised weights."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SEED_MODEL_JSON, needs_shared, shared_file
from tests.conftest import TFJS_MODELS as TFJS
from worker.inference.tfjs_graph import TfjsGraphModel
from worker.inference.weights import WeightsError

pytestmark = needs_shared(TFJS, "the shared TF.js models")


def pattern(size: int, a: int, b: int, c: int) -> np.ndarray:
    i, j, k = np.meshgrid(np.arange(size), np.arange(size), np.arange(3), indexing="ij")
    return ((a * i + b * j + c * k) % 256).astype(np.float32)[None]


def test_faceres_float16_weights_give_the_reference_embedding():
    model = TfjsGraphModel(TFJS / "faceres.json", outputs=["global_pooling/Mean"])
    e = model(pattern(224, 7, 3, 11) - 128.0)["global_pooling/Mean"]
    assert e.shape == (1, 1024)
    assert np.linalg.norm(e) == pytest.approx(4.5006, abs=2e-4)
    assert e.sum() == pytest.approx(20.543, abs=2e-3)
    np.testing.assert_allclose(e[0, :4], [0.0, 0.00435, 0.0, 0.0], atol=2e-5)


def test_blazeface_gives_the_reference_logits_and_runs_batched():
    model = TfjsGraphModel(TFJS / "blazeface-front.json")
    x = pattern(128, 5, 9, 13) / 127.5 - 1.0
    out = model(x)
    assert {k: v.shape for k, v in out.items()} == {
        "Identity": (1, 512, 1),
        "Identity_1": (1, 384, 1),
        "Identity_2": (1, 512, 16),
        "Identity_3": (1, 384, 16),
    }
    scores = np.concatenate([out["Identity"][0, :, 0], out["Identity_1"][0, :, 0]])
    regressors = np.concatenate([out["Identity_2"][0], out["Identity_3"][0]])
    assert int(scores.argmax()) == 189 and scores.max() == pytest.approx(-3.0833, abs=1e-3)
    assert regressors.sum() == pytest.approx(121489.35, rel=1e-5)
    batch = model(np.concatenate([x, x * 0.5, x]))  # the graph hard-codes batch 1; we do not
    assert batch["Identity_2"].shape == (3, 512, 16)
    np.testing.assert_allclose(batch["Identity_2"][0], out["Identity_2"][0], atol=1e-3)
    np.testing.assert_allclose(batch["Identity_2"][2], out["Identity_2"][0], atol=1e-3)


def test_missing_output_and_layers_model_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="is not a node"):
        TfjsGraphModel(TFJS / "blazeface-front.json", outputs=["nope"])
    doc = json.loads(shared_file(SEED_MODEL_JSON, "the seed's TF.js ArcFace manifest").read_text())
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="not a TF.js graph model|not a graph model"):
        TfjsGraphModel(tmp_path / "model.json")
