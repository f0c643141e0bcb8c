"""Every default the service ships with that more than one module needs, in one place: the worker's settings,
the model loader, the engine, the decoder and the producer's bulk runs all read them from here (no TensorFlow,
no rq). Each is overridden by its ``ARCFACE_*`` setting (or option) where one exists."""

from __future__ import annotations

DEFAULT_THRESHOLD = 0.68
"""ArcFace's cosine-distance threshold (deepface's): a pair is the same person when distance <= threshold."""

DEFAULT_WEIGHTS_URL = "https://github.com/serengil/deepface_models/releases/download/v1.0/arcface_weights.h5"
"""deepface's published ArcFace weights, downloaded once into the cache when no model path is set."""

DEFAULT_INPUT_SCALE = 1.0 / 255.0
"""Model input = pixel * scale + offset (the seed divides by 255)."""

DEFAULT_ALLOWED_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""The engine's compiled batch shapes (TF Serving's ``allowed_batch_sizes``)."""

DEFAULT_DETECT_BATCH_SIZES = (1, 4, 16)
"""BlazeFace's compiled batch shapes: it runs on the images of one batch that ask for detection."""

DEFAULT_MAX_PIXELS = 40_000_000
"""Larger images fail alone with ``image_too_large`` (Pillow's own limit is set to the same)."""

DEFAULT_MIN_SIDE = 8
"""Images with a smaller side fail alone with ``image_too_small``."""

DEFAULT_BULK_WINDOW = 256
"""A bulk run keeps at most this many images in flight."""
