"""Shared test fixtures: tiny real text corpora, a trained sentencepiece tokenizer and token shards."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The data/ tools are scripts that import their siblings by bare name, as they do when run from the shell.
sys.path.insert(0, str(REPO / "data"))

WORDS = ("the a of to and in is was for on that with as by at from his her it an were are which this be has "
         "had not but river mountain station engine market garden council minister storm village farmers "
         "police report morning spoke said would could people water power school years after before").split()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: needs PyPI (pip download)")


def make_english_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """n distinct English-like documents of a few sentences each."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = [str(w) for w in rng.choice(WORDS, rng.integers(min_words, max_words + 1))]
        words[0] = words[0].capitalize()
        docs.append(f"Report {i}. " + " ".join(words) + ".")
    return docs


@pytest.fixture(scope="session")
def english_docs() -> Callable[..., list[str]]:
    """The generator of English-like documents (a fixture, so test modules need not import conftest)."""
    return make_english_docs


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real sentencepiece model (vocab ~400) trained on generated text; returns PREFIX.model."""
    from build_tokenizer import train_tokenizer

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(make_english_docs(200, seed=123), prefix, vocab_size=400)
    return Path(f"{prefix}.model")


@pytest.fixture
def make_shards(tmp_path: Path, tokenizer: Path) -> Callable[..., Path]:
    """Build shards from n generated documents into a fresh folder; returns the folder."""
    from text_to_shards import write_shards

    def make(n_docs: int = 120, shard_tokens: int = 600, seed: int = 0, name: str = "shards") -> Path:
        out = tmp_path / name
        write_shards(make_english_docs(n_docs, seed), tokenizer, out, shard_tokens, progress=False)
        return out

    return make


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """datasets/text-like folder built by data/prepare_text.py from generated English-like documents."""
    base = tmp_path_factory.mktemp("textdata")
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_english_docs(500, seed=7)))
    out = base / "data"
    subprocess.run([sys.executable, "data/prepare_text.py", "--input", str(corpus), "--out", str(out),
                    "--vocab-size", "400"], cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes dataset (32x32, 9 frames at 8 fps): 48 train clips in 8 shards, 16 val clips."""
    from make_shapes_dataset import generate_split

    out = tmp_path_factory.mktemp("shapes")
    generate_split(out / "train", "train", 48, size=32, frames=9, fps=8, progress=False)
    generate_split(out / "val", "val", 16, size=32, frames=9, fps=8, progress=False)
    return out


@pytest.fixture(scope="session")
def flash_beep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small flash + beep dataset (64x64, 50 frames at 25 fps, H.264 + AAC): 16 train clips, 8 val clips."""
    out = tmp_path_factory.mktemp("flash_beep")
    subprocess.run([sys.executable, "data/make_flash_beep_dataset.py", "--out", str(out), "--train", "16", "--val",
                    "8", "--workers", "2"], cwd=REPO, check=True, capture_output=True, timeout=120)
    return out
