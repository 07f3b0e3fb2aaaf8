"""Fetch the default English corpus (the Lee news corpus shipped in the gensim wheel) as JSONL."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from documents import write_jsonl

PACKAGE = "gensim==4.4.0"
# Pinned platform so every machine downloads the same wheel (and never builds an sdist).
PIP_ARGS = ["--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--python-version", "311", "--implementation", "cp"]
FILES = {"train": "gensim/test/test_data/lee_background.cor", "val": "gensim/test/test_data/lee.cor"}
DEFAULT_CACHE = Path("~/.cache/difftrain/wheels").expanduser()


def download_wheel(cache: Path) -> Path:
    """Return the cached gensim wheel, downloading it with pip if needed."""
    found = sorted(cache.glob("gensim-4.4.0-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", PACKAGE, *PIP_ARGS, "-d", str(cache)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("gensim-4.4.0-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {PACKAGE} (it ships the default corpus); command: {' '.join(cmd)}\n"
            f"{result.stderr.strip()[-2000:]}"
        )
    return found[0]


def _decode(raw: bytes) -> str:
    # lee.cor is Latin-1 (a pound sign), not UTF-8; Latin-1 decodes every byte, so it is the fallback.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_corpus_files(cache: Path = DEFAULT_CACHE) -> dict[str, str]:
    """Return {split: raw text} from the installed gensim package, else from its wheel."""
    spec = importlib.util.find_spec("gensim")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if all((root / name).is_file() for name in FILES.values()):
            return {split: _decode((root / name).read_bytes()) for split, name in FILES.items()}
    with zipfile.ZipFile(download_wheel(cache)) as zf:
        return {split: _decode(zf.read(name)) for split, name in FILES.items()}


def fetch_default_corpus(out: Path, cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Write out/train.jsonl (300 documents) and out/val.jsonl (50 documents); returns their paths."""
    paths = {}
    for split, text in read_corpus_files(cache).items():
        docs = [line.strip() for line in text.splitlines() if line.strip()]
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(docs, paths[split])
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and val.jsonl")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the gensim wheel is kept")
    args = ap.parse_args()
    try:
        paths = fetch_default_corpus(args.out, args.cache)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
