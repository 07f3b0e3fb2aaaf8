"""A small real dataset (sentencepiece tokenizer + token shards) shared by the multi-process tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_english_docs
from tests.runs import ROOT


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """datasets/text-like folder built by data/prepare_text.py from generated English-like documents."""
    base = tmp_path_factory.mktemp("textdata")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_english_docs(500, seed=7)))
    out = base / "data"
    subprocess.run([sys.executable, "data/prepare_text.py", "--input", str(corpus), "--out", str(out),
                    "--vocab-size", "400"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out
