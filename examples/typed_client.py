"""A small program on the typed client API (``mypy --strict`` checks it in tests/test_producer_api.py)."""

from __future__ import annotations

import sys

import numpy as np

from producer.client.face_client import FaceClient
from producer.contract.errors import ArcFaceError, JobFailed, ResultTimeout
from producer.contract.results import EmbedResult, VerifyResult


def embed(client: FaceClient, path: str) -> np.ndarray:
    job_id: str = client.embed(path, ref="example")
    result: EmbedResult = client.result_embed(job_id, timeout=30)
    return result.embedding


def same_person(client: FaceClient, a: str, b: str, threshold: float | None = None) -> bool:
    result: VerifyResult = client.result_verify(client.verify(a, b, threshold=threshold), timeout=30)
    distance: float = result.distance
    return result.similar and distance <= result.threshold


def main(argv: list[str]) -> int:
    client = FaceClient()
    try:
        vector = embed(client, argv[0])
        print(vector.shape, same_person(client, argv[0], argv[1]))
    except JobFailed as exc:
        print(f"failed [{exc.code.value}]: {exc.error.message}", file=sys.stderr)
        return exc.exit_code
    except ResultTimeout as exc:
        print(f"no result yet for {exc.job_id}", file=sys.stderr)
        return exc.exit_code
    except ArcFaceError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
