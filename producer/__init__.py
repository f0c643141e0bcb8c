"""The producer side: what a backend service installs. Never imports TensorFlow.

Rooms: :mod:`producer.contract` (the wire, imported by both sides), :mod:`producer.client` (``FaceClient``),
:mod:`producer.cli` (``arcface-producer``), :mod:`producer.bulk` (pair files, bulk runs, bulk enrollment);
:mod:`producer.settings` and :mod:`producer.redisconn` configure and connect both sides.
"""
