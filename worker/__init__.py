"""The ArcFace worker, in rooms:

- :mod:`worker.inference`: the inference library (model, weights, decoding and the seed's preprocessing,
  detection, the compiled engine, the preprocessing processes); no Redis, no rq;
- :mod:`worker.batching`: the queue side (taking, registering, executing in engine batches, completing,
  maintenance); :mod:`worker.batching.rqfence` is the one module that holds rq's internals;
- :mod:`worker.gallery`: enrolled identities (Redis-backed galleries, the in-memory index, 1:N search);
- here: settings, the CLI, :mod:`worker.runtime` (what a job computes), :mod:`worker.jobs` (the rq job
  functions, whose names are on the wire), metrics, JSON logs and the demo.
"""
