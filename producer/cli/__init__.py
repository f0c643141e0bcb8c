"""``arcface-producer``: one module per command family (:mod:`.main` embed/verify/result/status, :mod:`.gallery`,
:mod:`.bulk`) and one parser helper (:mod:`.common`)."""

from producer.cli.main import main

__all__ = ["main"]
