"""Tokenise documents into webdataset shards of KEY.tokens.npy plus an index.json with counts."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
import webdataset as wds
from documents import ENCODING_ERRORS, chunk_document, iter_documents
from tqdm import tqdm

FORMAT = "tokens-v1"
CHUNK_DOCS = 256  # documents encoded per sentencepiece call (it is much faster in batches)


def _npy_bytes(ids: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


class _ShardWriter:
    """Rolls over to a new shard-NNNNNN.tar once the current one holds shard_tokens tokens."""

    def __init__(self, out_dir: Path, shard_tokens: int) -> None:
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.shards: list[dict[str, int | str]] = []
        self.writer: wds.TarWriter | None = None

    def write(self, key: str, ids: list[int]) -> None:
        if self.writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            # mtime=0 and fixed owner make the tar bytes a pure function of the input.
            self.writer = wds.TarWriter(str(self.out_dir / name), mtime=0, user="", group="", encoder=False)
            self.shards.append({"path": name, "samples": 0, "tokens": 0})
        self.writer.write({"__key__": key, "tokens.npy": _npy_bytes(ids)})
        self.shards[-1]["samples"] += 1
        self.shards[-1]["tokens"] += len(ids)
        if self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _keyed(docs: Iterable[str | tuple[int, str]]) -> Iterator[tuple[str, str]]:
    """(key, text) of each non-blank document or chunk: KEY = DOCUMENT_CHUNK (nine and five digits), the
    document id given with a (doc_id, chunk) pair (chunks of one document consecutive) or else its position."""
    last, chunk = None, 0
    for n, item in enumerate(docs):
        doc_id, text = item if isinstance(item, tuple) else (n, item)
        chunk = chunk + 1 if doc_id == last else 0
        last = doc_id
        if text.strip():  # a blank document would be a lone EOS in training
            yield f"{doc_id:09d}_{chunk:05d}", text


def write_shards(docs: Iterable[str | tuple[int, str]], tokenizer: str | Path, out_dir: str | Path,
                 shard_tokens: int = 1 << 20, progress: bool = True) -> dict:
    """Tokenise non-blank docs (no BOS/EOS) into out_dir/shard-*.tar and write out_dir/index.json; returns the index.

    A doc is a string or a (document id, chunk) pair (data/documents.chunk_document's pieces of one long
    document); each sample's key keeps its document id (KEY = DOCUMENT_CHUNK), index.json counts documents.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tokenizer, out = Path(tokenizer).resolve(), Path(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    # index.json marks a complete output: remove it first so an interrupted run is never mistaken for one.
    for stale in [out / "index.json", *out.glob("shard-*.tar")]:
        stale.unlink(missing_ok=True)
    writer, documents = _ShardWriter(out, shard_tokens), set()
    keyed = _keyed(docs)
    with tqdm(desc=f"shards {out.name}", unit="doc", disable=not progress) as bar:
        while chunk := list(itertools.islice(keyed, CHUNK_DOCS)):
            for (key, _), ids in zip(chunk, sp.encode([text for _, text in chunk], out_type=int)):
                writer.write(key, ids)
                documents.add(key.split("_")[0])
            bar.update(len(chunk))
    writer.close()
    if not writer.shards:
        raise ValueError(f"no non-empty documents to write into {out}")
    index = {"format": FORMAT, "tokenizer": str(tokenizer), "eos_id": sp.eos_id(),
             "vocab_size": sp.get_piece_size(), "documents": len(documents), "shards": writer.shards}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or folders of them")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece PREFIX.model")
    ap.add_argument("--out", required=True, help="output folder for shards and index.json")
    ap.add_argument("--shard-tokens", type=int, default=1 << 20, help="roll over to a new shard at ~N tokens")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    ap.add_argument("--chunk-chars", type=int, help="cut documents longer than N characters at paragraph breaks")
    ap.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                    help="non-UTF-8 input: stop naming it, leave it out (skip) or decode bad bytes as U+FFFD")
    args = ap.parse_args()
    docs = iter_documents(args.input, args.text_key, args.encoding_errors)
    if args.chunk_chars:
        docs = ((i, c) for i, doc in enumerate(docs) for c in chunk_document(doc, args.chunk_chars))
    try:
        index = write_shards(docs, args.tokenizer, args.out, args.shard_tokens)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(index['shards'])} shards, {sum(s['tokens'] for s in index['shards'])} tokens to {args.out}")


if __name__ == "__main__":
    main()
