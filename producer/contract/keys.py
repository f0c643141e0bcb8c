"""Every name the service puts in Redis or on the wire, in one place (as arq's ``constants.py``): the queue, the
job functions (the allow-list), the job meta and result-entry fields of a failure, the model info the workers
publish, and the gallery keys. rq's own key layouts are rq's: the worker reaches them only through
:mod:`worker.batching.rqfence`. Imports nothing of the project.
"""

from __future__ import annotations

DEFAULT_QUEUE = "arcface"
EMBED_FUNC = "worker.jobs.embed"
VERIFY_FUNC = "worker.jobs.verify"
EMBED_BATCH_FUNC = "worker.jobs.embed_batch"
VERIFY_BATCH_FUNC = "worker.jobs.verify_batch"
ENROLL_FUNC = "worker.jobs.enroll"
ENROLL_BATCH_FUNC = "worker.jobs.enroll_batch"
IDENTIFY_FUNC = "worker.jobs.identify"
FORGET_FUNC = "worker.jobs.forget"
# The gallery kinds (producer.contract.gallery); verify also takes a subject or an embedding there.
GALLERY_FUNCTIONS = frozenset({ENROLL_FUNC, ENROLL_BATCH_FUNC, IDENTIFY_FUNC, FORGET_FUNC})
ALLOWED_FUNCTIONS = frozenset({EMBED_FUNC, VERIFY_FUNC, EMBED_BATCH_FUNC, VERIFY_BATCH_FUNC}) | GALLERY_FUNCTIONS
ERROR_META_KEY = "error"  # job.meta[...] holds {"code", "message"} of a failed job
ERROR_ENTRY_FIELD = "error"  # the same JSON in a failed job's result-stream entry (a field rq does not read)
SERIALIZER = "producer.contract.rqjob.JSONSerializer"  # dotted path, for `rq worker --serializer`
JOB_CLASS = "producer.contract.rqjob.SafeJob"  # dotted path, for `rq worker --job-class`
# + queue: JSON {"model","dim","threshold","input_size","detect","started_at"}, set by workers.
MODEL_INFO_PREFIX = "arcface:model:"


def model_info_key(queue: str) -> str:
    """The Redis string where the workers of ``queue`` publish what they serve (see docs/wire-format.md)."""
    return MODEL_INFO_PREFIX + queue


# --- enrolled identities (see producer.contract.gallery) ------------------------------------------------------------
GALLERIES_KEY = "arcface:galleries"
GALLERY_KEY_PREFIX = "arcface:gallery:"
EVENTS_KEY = "arcface:gallery-events"
EVENTS_SEQ_KEY = "arcface:gallery-events:seq"
EVENTS_MAXLEN = 10_000  # about 20 MiB of 512-d events; a worker further behind reloads from the hashes
DEFAULT_GALLERY = "default"


def gallery_key(gallery: str) -> str:
    """The hash binding ``gallery`` to a model: ``model``, ``dim``, ``created_at``."""
    return f"{GALLERY_KEY_PREFIX}{gallery}"


def subjects_key(gallery: str) -> str:
    """Hash subject -> enrollment count."""
    return f"{GALLERY_KEY_PREFIX}{gallery}:subjects"


def subject_key(gallery: str, subject: str) -> str:
    """Set of the subject's enrollment ids."""
    return f"{GALLERY_KEY_PREFIX}{gallery}:subject:{subject}"


def embeddings_key(gallery: str) -> str:
    """Hash enrollment id -> raw little-endian float32 embedding."""
    return f"{GALLERY_KEY_PREFIX}{gallery}:embeddings"


def enrollments_key(gallery: str) -> str:
    """Hash enrollment id -> JSON record (subject, enrolled_at, meta)."""
    return f"{GALLERY_KEY_PREFIX}{gallery}:enrollments"
