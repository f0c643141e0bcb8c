"""The ArcFace worker: model, weights, preprocessing, compiled engine and the micro-batching rq worker."""
