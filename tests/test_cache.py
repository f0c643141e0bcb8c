"""The cache directory: files are written whole and renamed into place, checked when read, rebuilt when damaged;
concurrent first runs share one file. And the demo, which must never print nonsense with exit 0."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import structlog

from tests.conftest import REPO, face_paths
from tests.patience import patience
from worker.demo import RANDOM_WEIGHTS, output_problems
from worker.inference.cache import cached_file, sha256_of
from worker.inference.weights import WeightsError, check_weights_file

# --- a damaged file in the cache -------------------------------------------------------------------


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _zero_in_place(path: Path) -> None:
    """Same size, every byte after the first MiB zero: what a file whose data never reached the disk reads as."""
    with path.open("r+b") as f:
        f.seek(1 << 20)
        f.write(bytes(path.stat().st_size - (1 << 20)))


def _zero_weights(path: Path) -> None:
    """A well-formed HDF5 file whose datasets are zero except the first 1,024 values (the file of the report)."""
    with h5py.File(path, "a") as f:
        datasets: list[h5py.Dataset] = []
        f.visititems(lambda _name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        kept = 0
        for ds in datasets:
            values = np.zeros(ds.shape, ds.dtype)
            if kept < 1024:
                n = min(1024 - kept, values.size)
                values.reshape(-1)[:n] = np.asarray(ds).reshape(-1)[:n]
                kept += n
            ds[...] = values


@pytest.mark.parametrize(
    ("damage", "record"),
    [(_truncate, True), (_zero_in_place, True), (_truncate, False), (_zero_weights, False)],
    ids=["truncated", "zeroed-in-place", "truncated-no-record", "zero-weights-no-record"],
)
def test_a_damaged_cache_file_is_detected_logged_and_rebuilt(tmp_path, arcface_h5, damage, record):
    """With its record (size + sha256 written when it was made) any change is caught; without one (a file
    made before records were kept, as in the report) the weights themselves are checked."""
    dest = tmp_path / RANDOM_WEIGHTS
    builds: list[Path] = []

    def make(part: Path) -> None:
        builds.append(part)
        shutil.copyfile(arcface_h5, part)

    assert cached_file(dest, make, check=check_weights_file) == dest
    assert cached_file(dest, make, check=check_weights_file) == dest
    assert len(builds) == 1  # the second call used the checked file
    if not record:
        (tmp_path / f"{RANDOM_WEIGHTS}.sha256").unlink()
    damage(dest)
    if not record:
        with pytest.raises(WeightsError):
            check_weights_file(dest)
    with structlog.testing.capture_logs() as logs:
        assert cached_file(dest, make, check=check_weights_file, what="demo weights") == dest
    assert len(builds) == 2
    assert sha256_of(dest) == sha256_of(arcface_h5)
    check_weights_file(dest)
    corrupt = [e for e in logs if e["event"] == "cache_file_corrupt"]
    assert len(corrupt) == 1 and corrupt[0]["path"] == str(dest) and corrupt[0]["what"] == "demo weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        RANDOM_WEIGHTS,
        f"{RANDOM_WEIGHTS}.lock",
        f"{RANDOM_WEIGHTS}.sha256",
    ]


def test_a_new_file_that_fails_its_check_is_never_put_in_place(tmp_path, arcface_h5):
    dest = tmp_path / RANDOM_WEIGHTS

    def make(part: Path) -> None:
        shutil.copyfile(arcface_h5, part)
        _zero_weights(part)

    with pytest.raises(WeightsError, match=r"kernel '.*' is all zeros \(\d+ of 38 kernels\)"):
        cached_file(dest, make, check=check_weights_file)
    assert [p.name for p in tmp_path.iterdir()] == [f"{RANDOM_WEIGHTS}.lock"]


def test_the_model_loader_refuses_weights_whose_kernels_are_zero(tmp_path, arcface_h5):
    from worker.inference.model import load_face_model

    zeroed = tmp_path / "w.h5"
    shutil.copyfile(arcface_h5, zeroed)
    _zero_weights(zeroed)
    with pytest.raises(WeightsError, match=r"is all zeros .*the file is damaged or was cut short"):
        load_face_model(zeroed)


# --- the demo --------------------------------------------------------------------------------------


def test_demo_output_check_names_every_nonsense_number():
    assert output_problems([1.0, 0.99995, 1.00004], [0.0, 0.42, 2.0]) == []
    assert output_problems([1.0, 0.0, math.nan], [0.3, math.nan, 1.0, -0.1]) == [
        "embedding 1 has norm 0.0000, not 1 (the model produces no usable embeddings)",
        "embedding 2 has norm nan, not 1 (the model produces no usable embeddings)",
        "distance 1 is nan, outside [0, 2]",
        "distance 3 is -0.1, outside [0, 2]",
    ]


# What the demo does first, in a process of its own: the random weights from the cache, loaded and used.
_FIRST_RUN = """
import json, sys
from pathlib import Path
import numpy as np
from worker.demo import random_weights
from worker.inference.cache import sha256_of
from worker.inference.engine import Engine
from worker.inference.model import load_face_model

path = random_weights(Path(sys.argv[1]))
engine = Engine(load_face_model(path), allowed_batch_sizes=(2,))
a, b = engine.embed_images([Path(p).read_bytes() for p in sys.argv[2:4]])
print(json.dumps({
    "norms": [float(np.linalg.norm(a.astype("f8"))), float(np.linalg.norm(b.astype("f8")))],
    "distance": engine.verify(a, b).distance,
    "sha256": sha256_of(path),
}))
"""


def test_two_first_runs_at_once_share_one_cache_file_and_both_get_sane_numbers(tmp_path):
    """Two demos started together on a machine with an empty cache: both build-or-wait for the random weights,
    neither crashes, both load a whole file and embed real faces to unit norm."""
    cache = tmp_path / "cache"
    faces = [str(p) for p in face_paths()[:2]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.monotonic()
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_RUN, str(cache), *faces],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=patience(240)) for run in runs]
    print(f"two first runs: {time.monotonic() - start:.1f}s")
    results = []
    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    for r in results:
        assert output_problems(r["norms"], [r["distance"]]) == []
        assert r["norms"] == pytest.approx([1.0, 1.0], abs=1e-5)
        assert 0.0 < r["distance"] < 2.0
    assert results[0]["sha256"] == results[1]["sha256"] == sha256_of(cache / RANDOM_WEIGHTS)
    assert results[0]["distance"] == results[1]["distance"]  # the same file, so the same numbers
    assert sorted(p.name for p in cache.iterdir()) == [
        RANDOM_WEIGHTS,
        f"{RANDOM_WEIGHTS}.lock",
        f"{RANDOM_WEIGHTS}.sha256",
    ]
