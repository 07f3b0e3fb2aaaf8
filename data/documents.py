"""Read documents from .txt and .jsonl files or folders of them; shared by the data tools."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl")


def list_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) to a sorted list of .txt/.jsonl files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # Sorted so that document order, and hence shard contents, never depend on the file system.
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"unsupported input file {p}: expected one of {', '.join(SUFFIXES)}")
            files.append(p)
        else:
            raise FileNotFoundError(f"input path {p} does not exist")
    return files


def iter_documents(paths: Iterable[str | Path], text_key: str = "text") -> Iterator[str]:
    """Yield documents: a .txt file is one document, a .jsonl file has one document per line."""
    for f in list_files(paths):
        if f.suffix == ".txt":
            text = f.read_text(encoding="utf-8")
            if text.strip():
                yield text
            continue
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"{f}:{n}: expected an object with a string field {text_key!r}")
                if record[text_key].strip():
                    yield record[text_key]


def write_jsonl(docs: Iterable[str], path: Path, text_key: str = "text") -> int:
    """Write documents as JSONL ({text_key: doc} per line) atomically; returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({text_key: doc}, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
