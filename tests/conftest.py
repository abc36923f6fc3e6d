"""Shared fixtures; the helpers themselves live in qtale_testing.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtale_testing import TEXT, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(TEXT * 3)
    return p
