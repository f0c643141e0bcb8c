"""The documentation against the code: the generated configuration page, the README's size, and every
ARCFACE_* name the docs mention. Reads files only: no Redis, no worker, no TensorFlow."""

from __future__ import annotations

import re
from pathlib import Path

from producer.settings import NOT_SETTINGS  # variables read outside the settings classes (tests, demo)
from tests.conftest import REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIG_PAGE = DOCS / "configuration.md"
README_MAX_LINES = 250
NAME = re.compile(r"\bARCFACE_[A-Z0-9_]*[A-Z0-9]\b")  # ARCFACE_QUEUE; not the bare prefix ARCFACE_ or ARCFACE_*
SETTINGS_ROW = re.compile(r"^\s*\|\s*`?ARCFACE_", re.MULTILINE)


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_configuration_page_is_generated_from_the_settings():
    from worker.settings_doc import COMMAND, render

    assert CONFIG_PAGE.read_text(encoding="utf-8") == render(), (
        f"docs/configuration.md differs from the settings classes: run `{COMMAND}` and commit the page"
    )


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_every_arcface_name_in_the_docs_is_a_real_setting():
    from worker.settings_doc import variables

    known = variables()
    for name in NOT_SETTINGS:  # each must still be read somewhere, or it is stale too
        assert any(name in p.read_text(encoding="utf-8") for p in REPO.glob("[tw]*/**/*.py")), name
    stale = {
        f"{page.relative_to(REPO)}: {name}"
        for page in doc_pages()
        for name in NAME.findall(page.read_text(encoding="utf-8"))
        if name not in known and name not in NOT_SETTINGS
    }
    assert not stale, f"names no settings class reads (renamed or removed?): {sorted(stale)}"


def test_settings_tables_are_written_only_by_the_generator():
    hand_written = [
        str(page.relative_to(REPO))
        for page in doc_pages()
        if page != CONFIG_PAGE and SETTINGS_ROW.search(page.read_text(encoding="utf-8"))
    ]
    assert not hand_written, f"settings tables outside docs/configuration.md: {hand_written} (link to it instead)"
