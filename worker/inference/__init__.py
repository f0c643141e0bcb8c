"""The inference library: model building and weights (deepface's .h5, the seed's TF.js layers model, a user's
Keras/SavedModel), decoding and the seed's preprocessing, BlazeFace detection and alignment, the batched engine,
and the preprocessing processes. It imports no Redis and no rq (tests/test_preprocess.py checks), so it can be
used on its own: ``load_face_model``, ``preprocess``, ``Engine``.
"""
