"""The network and its three weight sources: deepface .h5, the seed's TF.js layers model, a user's model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import SEED_MODEL_JSON, randomise_statistics, shared_file, write_deepface_h5
from worker.inference.model import PARAMETER_COUNT, build_arcface, load_face_model
from worker.inference.weights import WeightsError, variable_names

SHARD_BYTES = 4 * 1024 * 1024  # tensorflowjs_converter's default shard size


@pytest.fixture(scope="module")
def seed_manifest() -> dict:
    return json.loads(shared_file(SEED_MODEL_JSON, "the seed's TF.js ArcFace manifest").read_text())


def _inputs(n: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 112, 112, 3)).astype(np.float32)


def test_architecture_matches_seed_topology_and_parameter_count(seed_manifest):
    model = build_arcface()
    assert model.count_params() == PARAMETER_COUNT == 34_165_184
    seed_layers = seed_manifest["modelTopology"]["model_config"]["config"]["layers"]
    assert [layer.name for layer in model.layers] == [entry["config"]["name"] for entry in seed_layers]
    assert [type(layer).__name__ for layer in model.layers] == [entry["class_name"] for entry in seed_layers]
    manifest = {w["name"]: tuple(w["shape"]) for g in seed_manifest["weightsManifest"] for w in g["weights"]}
    variables = {name: tuple(v.shape) for name, v in variable_names(model).items()}
    assert len(manifest) == 276
    assert variables == manifest
    assert model.output_shape == (None, 512)


def test_deepface_h5_round_trip_gives_identical_embeddings(tmp_path):
    from worker.inference.engine import Engine

    original = build_arcface()
    randomise_statistics(original)
    # Keras 2 (':0' suffixes, as in deepface's file) and Keras 3 legacy writer names both load.
    for keras2 in (True, False):
        path = write_deepface_h5(original, tmp_path / f"w{keras2}.h5", keras2_names=keras2)
        loaded = load_face_model(path)
        for name, var in variable_names(loaded.keras_model).items():
            np.testing.assert_array_equal(var.numpy(), variable_names(original)[name].numpy(), err_msg=name)
    # and a file written by Keras's own legacy HDF5 writer (an implementation independent of ours)
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(tmp_path / "keras_writer.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, original)
    by_keras = load_face_model(tmp_path / "keras_writer.h5")
    for name, var in variable_names(by_keras.keras_model).items():
        np.testing.assert_array_equal(var.numpy(), variable_names(original)[name].numpy(), err_msg=name)
    x = _inputs()
    direct = original(x / 255.0, training=False).numpy()
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    np.testing.assert_allclose(Engine(loaded, (1, 2)).embed(x), direct, atol=1e-6)


def _write_seed_shards(manifest: dict, folder) -> dict[str, np.ndarray]:
    """Write group1-shardNofM.bin for the real seed model.json, each tensor filled with values that
    identify it (its manifest index and each element's position)."""
    expected: dict[str, np.ndarray] = {}
    chunks = []
    for index, entry in enumerate(manifest["weightsManifest"][0]["weights"]):
        n = int(np.prod(entry["shape"]))
        values = (index * 1.0 + (np.arange(n) % 1000) / 1000.0).astype("<f4").reshape(entry["shape"])
        expected[entry["name"]] = values
        chunks.append(values.tobytes())
    blob = b"".join(chunks)
    paths = manifest["weightsManifest"][0]["paths"]
    assert len(paths) == 33 and -(-len(blob) // SHARD_BYTES) == 33
    for i, name in enumerate(paths):
        (folder / name).write_bytes(blob[i * SHARD_BYTES : (i + 1) * SHARD_BYTES])
    return expected


def test_tfjs_layers_model_every_manifest_tensor_lands_on_its_variable(tmp_path, seed_manifest):
    shutil.copy(SEED_MODEL_JSON, tmp_path / "model.json")
    expected = _write_seed_shards(seed_manifest, tmp_path)
    loaded = load_face_model(tmp_path / "model.json")
    variables = variable_names(loaded.keras_model)
    assert set(variables) == set(expected) and len(expected) == 276
    for name, values in expected.items():
        np.testing.assert_array_equal(variables[name].numpy(), values, err_msg=name)
    # A directory holding model.json works too.
    assert load_face_model(tmp_path).embedding_dim == 512


def test_tfjs_missing_shard_and_short_shard_fail_before_loading(tmp_path, seed_manifest):
    shutil.copy(SEED_MODEL_JSON, tmp_path / "model.json")
    _write_seed_shards(seed_manifest, tmp_path)
    last = tmp_path / "group1-shard33of33.bin"
    last.write_bytes(last.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="end before tensor 'embedding/moving_variance'"):
        load_face_model(tmp_path / "model.json")
    last.unlink()
    with pytest.raises(WeightsError, match="shard missing"):
        load_face_model(tmp_path / "model.json")


def test_tfjs_quantized_entries_are_dequantized(tmp_path):
    from worker.inference.weights import read_tfjs_weights

    q = np.array([0, 1, 255], np.uint8)
    h = np.array([0.5, -2.0], np.float16)
    manifest = {
        "format": "layers-model",
        "weightsManifest": [
            {
                "paths": ["g1.bin"],
                "weights": [
                    {
                        "name": "a/kernel",
                        "shape": [3],
                        "dtype": "float32",
                        "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0},
                    },
                    {"name": "b/kernel", "shape": [2], "dtype": "float32", "quantization": {"dtype": "float16"}},
                ],
            }
        ],
    }
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    (tmp_path / "g1.bin").write_bytes(q.tobytes() + h.tobytes())
    out = read_tfjs_weights(tmp_path / "model.json")
    np.testing.assert_array_equal(out["a/kernel"], [-1.0, -0.5, 126.5])
    np.testing.assert_array_equal(out["b/kernel"], [0.5, -2.0])


def test_h5_with_missing_layer_names_first_mismatch_and_leaves_nothing_loaded(tmp_path, arcface_h5):
    import h5py

    broken = tmp_path / "broken.h5"
    shutil.copy(arcface_h5, broken)
    with h5py.File(broken, "a") as f:
        names = [n for n in f.attrs["layer_names"] if n != b"conv3_block2_2_bn"]
        f.attrs["layer_names"] = np.array(names)
    with pytest.raises(WeightsError, match=r"no tensor for model variable 'conv3_block2_2_bn/gamma'"):
        load_face_model(broken)


def test_h5_with_wrong_shape_is_refused(tmp_path):
    model = build_arcface()
    path = write_deepface_h5(model, tmp_path / "w.h5")
    import h5py

    with h5py.File(path, "a") as f:
        del f["dense"]["dense/bias:0"]
        f["dense"].create_dataset("dense/bias:0", data=np.zeros(256, np.float32))
    with pytest.raises(WeightsError, match=r"'dense/bias' has shape \(256,\), the model needs \(512,\)"):
        load_face_model(path)


def test_file_of_no_known_format_is_refused(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"this is not a model")
    with pytest.raises(WeightsError, match="matches no supported format"):
        load_face_model(junk)
    with pytest.raises(WeightsError, match="no such file"):
        load_face_model(tmp_path / "missing.h5")


def test_keras3_weights_file_is_refused_with_a_hint(tmp_path):
    model = build_arcface()
    model.save_weights(tmp_path / "model.weights.h5")
    with pytest.raises(WeightsError, match="stores weights by position"):
        load_face_model(tmp_path / "model.weights.h5")


def test_user_keras_model_and_savedmodel_are_served_with_their_own_size_and_normalisation(tmp_path):
    import keras
    import tensorflow as tf

    from worker.inference.engine import Engine

    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(32)(x)
    user = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    expected = user(x * 0.5 - 1.0).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)

    user.save(tmp_path / "user.keras")
    user.export(tmp_path / "saved")  # a SavedModel directory with serving_default
    for source in (tmp_path / "user.keras", tmp_path / "saved"):
        model = load_face_model(source, name="mine", scale=0.5, offset=-1.0, threshold=0.4)
        assert (model.input_size, model.embedding_dim, model.threshold) == (64, 32, 0.4)
        np.testing.assert_allclose(Engine(model, (1, 4)).embed(x), expected, atol=1e-5)
    assert tf.saved_model.contains_saved_model(str(tmp_path / "saved"))


def test_user_model_with_wrong_output_rank_is_refused(tmp_path):
    import keras

    inputs = keras.Input((32, 32, 3))
    bad = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    bad.save(tmp_path / "bad.keras")
    with pytest.raises(WeightsError, match="output must be a 2-D embedding batch"):
        load_face_model(tmp_path / "bad.keras")
