"""The gallery tests' fixtures: a model name of the test's own, and started stores on the session's Redis with
no galleries left from other tests. Test modules load them with ``pytest_plugins = ["tests.gallery_fixtures"]``."""

from __future__ import annotations

import uuid

import pytest

from worker.gallery import GalleryStore


@pytest.fixture()
def model_name() -> str:
    """A model name of this test's own: a store only holds galleries bound to its model, so tests sharing the
    session's Redis never see each other's galleries."""
    return f"m-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def no_galleries(redis_server):
    """Each test with stores starts with no galleries in the session's Redis (only these tests write gallery keys)."""
    conn = redis_server.client()
    keys = list(conn.scan_iter(match="arcface:galler*", count=1000))
    if keys:
        conn.delete(*keys)


@pytest.fixture()
def stores(redis_server, no_galleries):
    """Make started stores (each its own connection: one per 'worker'); all stopped at the end."""
    made: list[GalleryStore] = []

    def make(model: str | None, start: bool = True, **kw) -> GalleryStore:
        store = GalleryStore(redis_server.client(), model, **{"block_ms": 100, **kw})
        made.append(store)
        return store.start() if start else store

    yield make
    for s in made:
        s.stop()
