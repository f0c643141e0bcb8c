"""``python -m producer.cli``: the same as ``arcface-producer``."""

from producer.cli.main import main

main()
