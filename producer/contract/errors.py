"""The producer library's exceptions: every error :class:`~producer.client.FaceClient` raises is one of these.

All share the base :class:`ArcFaceError`, so ``except ArcFaceError`` catches anything the library raises on
purpose; what went wrong is carried as data (``code``, ``job_id``, ``variable``), never only in the text.

=========================  ===========================================================  =========
exception                  when                                                         exit code
=========================  ===========================================================  =========
:class:`JobFailed`         the job ran and failed (``code``, ``error.message``)          1
:class:`ConfigError`       an ``ARCFACE_*`` setting (environment or ``.env``) is invalid  2
:class:`InputError`        a request the client refuses before enqueueing (``code``)     2
:class:`JobNotFound`       no such job (bad id, expired, not an ArcFace job)             2
:class:`ResultNotKept`     the job keeps no result (``result_ttl``/``failure_ttl`` 0)     2
:class:`ResultTimeout`     no result within the timeout (the job may still finish)       3
:class:`RedisUnavailable`  Redis cannot be reached or refused the command                4
:class:`RedisAuthFailed`   Redis refused the password or ACL user (a RedisUnavailable)   4
:class:`ModelLoadError`    the worker's model or detector cannot be loaded               5
=========================  ===========================================================  =========

The exit codes of both command-line programs (``arcface-producer``, ``arcface-worker``) are these classes'
``exit_code`` (one meaning each), plus 0 (done, or enqueued) and 130 (interrupted).
"""

from __future__ import annotations

from producer.contract.codes import ErrorCode, JobError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_REDIS, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


class ArcFaceError(Exception):
    """Base of every exception the producer library raises on purpose."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ArcFaceError, ValueError):
    """An invalid setting. ``variable`` names the ``ARCFACE_*`` variable (or CLI flag); the message says
    which values are accepted."""

    exit_code = EXIT_USAGE

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


class InputError(ArcFaceError, ValueError):
    """A request the client cannot send (missing file, too large, unsupported type, a value outside the
    contract); ``code`` is the :class:`~producer.contract.codes.ErrorCode` a worker would have failed it with."""

    exit_code = EXIT_USAGE

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class JobNotFound(ArcFaceError, LookupError):
    """No such job in Redis: never enqueued, its result TTL has passed, an id rq refuses, or a job hash
    that is not an ArcFace job (another application's, or corrupt). ``job_id`` is the id asked for."""

    exit_code = EXIT_USAGE

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class ResultNotKept(JobNotFound):
    """The job was enqueued with ``result_ttl`` 0 (``ARCFACE_RESULT_TTL=0``) or ``failure_ttl`` 0: its outcome
    is deleted the moment it is written, so waiting for it could only time out. Raised at once."""


class JobFailed(ArcFaceError):
    """The job ran and failed; ``code`` (also ``error.code``) is its stable
    :class:`~producer.contract.codes.ErrorCode`."""

    exit_code = EXIT_FAILED

    def __init__(self, job_id: str, error: JobError) -> None:
        super().__init__(f"job {job_id} failed [{error.code.value}]: {error.message}")
        self.job_id = job_id
        self.error = error
        self.code = error.code


class ResultTimeout(ArcFaceError, TimeoutError):
    """No result arrived within the timeout; the job may still finish later (fetch it again by ``job_id``)."""

    exit_code = EXIT_TIMEOUT

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class RedisUnavailable(ArcFaceError):
    """Redis cannot be reached (or the embedded one cannot be started), or it refused a command."""

    exit_code = EXIT_REDIS


class RedisAuthFailed(RedisUnavailable):
    """Redis answered but refused the credentials: a wrong or missing password, an unknown or disabled ACL user,
    or an ACL user not allowed to run the command. Retrying cannot help: fix ``ARCFACE_REDIS_URL``."""


class ModelLoadError(ArcFaceError):
    """The worker cannot load its model or detector (missing, corrupt, wrong shapes, a failed download)."""

    exit_code = EXIT_MODEL


__all__ = [
    "ArcFaceError",
    "ConfigError",
    "InputError",
    "JobFailed",
    "JobNotFound",
    "ModelLoadError",
    "RedisAuthFailed",
    "RedisUnavailable",
    "ResultNotKept",
    "ResultTimeout",
]
