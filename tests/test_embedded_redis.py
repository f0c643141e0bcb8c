"""The embedded default: no ARCFACE_REDIS_URL -> a real redis-server under the data dir, shared and persistent."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from producer.client.face_client import FaceClient
from producer.redisconn import EmbeddedRedis, connect
from producer.settings import ProducerSettings
from tests.conftest import face_paths


@pytest.fixture()
def data_dir(monkeypatch):
    # unix socket paths are limited to ~107 bytes: keep it short
    with tempfile.TemporaryDirectory(prefix="afr-") as d:
        monkeypatch.delenv("ARCFACE_REDIS_URL", raising=False)
        monkeypatch.setenv("ARCFACE_DATA_DIR", d)
        yield Path(d)
        EmbeddedRedis(Path(d)).shutdown()


def test_embedded_redis_starts_is_reused_and_keeps_jobs_across_restart(data_dir):
    settings = ProducerSettings()
    assert settings.redis_url is None
    first = connect(settings)
    run_id = first.info("server")["run_id"]
    assert connect(ProducerSettings()).info("server")["run_id"] == run_id  # a second process finds the same server
    assert first.config_get("appendonly")["appendonly"] == "yes"

    client = FaceClient(settings, first)
    job_id = client.embed(face_paths()[0])
    embedded = EmbeddedRedis(data_dir)
    embedded.shutdown()
    assert not embedded.alive()

    again = connect(ProducerSettings())  # starts it anew from its AOF
    assert again.info("server")["run_id"] != run_id
    restarted = FaceClient(ProducerSettings(), again)
    assert restarted.status(job_id) == "queued"
    assert job_id in restarted.queue.job_ids
