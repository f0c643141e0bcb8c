"""The producer side: job contract, client, CLI and bulk runs. Never imports TensorFlow.

The contract's names load on first use, so that importing one submodule (say :mod:`producer.codes` from the
worker's inference library) does not pull in rq.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from producer.jobs import EmbedRequest, EmbedResult, ErrorCode, ImageRef, JobError, VerifyRequest, VerifyResult

__all__ = ["EmbedRequest", "EmbedResult", "ErrorCode", "ImageRef", "JobError", "VerifyRequest", "VerifyResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("producer.jobs"), name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
