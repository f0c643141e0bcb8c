"""The producer side: job contract, client, CLI and bulk runs. Never imports TensorFlow."""

from producer.jobs import EmbedRequest, EmbedResult, ErrorCode, ImageRef, JobError, VerifyRequest, VerifyResult

__all__ = ["EmbedRequest", "EmbedResult", "ErrorCode", "ImageRef", "JobError", "VerifyRequest", "VerifyResult"]
