"""Read documents from .txt and .jsonl files or folders of them; shared by the data tools."""

from __future__ import annotations

import json
import re
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


ENCODING_ERRORS = ("strict", "skip", "replace")


def _decode(raw: bytes, where: str, errors: str, skipped: list[str] | None) -> str | None:
    """UTF-8 text of raw; on bad bytes: a one-line ValueError naming where (strict), None after recording
    where in skipped (skip), or U+FFFD for each bad byte (replace)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode("utf-8", errors="replace")
        if errors == "skip":
            if skipped is not None:
                skipped.append(where)
            return None
        raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it, or "
                         "pass --encoding-errors skip (leave it out) or replace (decode bad bytes as U+FFFD)") from None


def iter_documents(paths: Iterable[str | Path], text_key: str = "text", errors: str = "strict",
                   skipped: list[str] | None = None) -> Iterator[str]:
    """Yield documents: a .txt file is one document, a .jsonl file has one document per line.

    errors says what non-UTF-8 input does: "strict" raises naming FILE (or FILE:LINE), "skip" leaves that
    file (or .jsonl line) out and appends its name to skipped, "replace" decodes bad bytes as U+FFFD.
    """
    if errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding errors must be one of {', '.join(ENCODING_ERRORS)}, got {errors!r}")
    for f in list_files(paths):
        if f.suffix == ".txt":
            text = _decode(f.read_bytes(), str(f), errors, skipped)
            if text is not None and text.strip():
                yield text
            continue
        with f.open("rb") as fh:  # bytes: a bad line is named by its number and the rest still read
            for n, raw in enumerate(fh, 1):
                line = _decode(raw, f"{f}:{n}", errors, skipped)
                if line is None or not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{n}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"{f}:{n}: expected an object with a string field {text_key!r}")
                if record[text_key].strip():
                    yield record[text_key]


# Where a long document may be cut, best first: a paragraph break, a line break, after a sentence, any space.
_BOUNDARIES = (re.compile(r"\n[ \t\r\f\v]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"(?<=[.!?])\s+"),
               re.compile(r"\s+"))


def _pieces(text: str, max_chars: int, level: int = 0) -> list[str]:
    """text cut after the boundaries of one level (each piece keeps its trailing separator); pieces still
    longer than max_chars are cut at the next level, and at the last level every max_chars characters."""
    if len(text) <= max_chars:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    cuts = [m.end() for m in _BOUNDARIES[level].finditer(text) if 0 < m.end() < len(text)]
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [p for part in parts for p in _pieces(part, max_chars, level + 1)]


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Cut a long document into chunks of at most max_chars characters, at paragraph breaks where it can
    (then line breaks, sentence ends, spaces); "".join(chunks) == text. Short documents stay whole."""
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    chunks: list[str] = []
    for piece in _pieces(text, max_chars):
        if chunks and len(chunks[-1]) + len(piece) <= max_chars:
            chunks[-1] += piece  # greedy: as many whole paragraphs as fit
        else:
            chunks.append(piece)
    return chunks


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
