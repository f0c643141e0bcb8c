"""The job contract both sides import: every Redis name (:mod:`.keys`), error codes and the one exception tree
(:mod:`.codes`, :mod:`.errors`), shared defaults (:mod:`.defaults`), requests and results (:mod:`.requests`,
:mod:`.results`, :mod:`.gallery`, :mod:`.gallery_results`), dispatch over job kinds (:mod:`.wire`), and rq's job
class with the JSON serializer (:mod:`.rqjob`, the only module here that imports rq).

This package imports nothing at import time, so ``producer.contract.codes`` can be used without pydantic models or
rq being loaded.
"""
