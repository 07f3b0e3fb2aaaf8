"""Tokenise documents into webdataset shards of KEY.tokens.npy plus an index.json with counts."""

from __future__ import annotations

import argparse
import io
import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import webdataset as wds
from documents import iter_documents
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


def write_shards(docs: Iterable[str], tokenizer: str | Path, out_dir: str | Path, shard_tokens: int = 1 << 20,
                 progress: bool = True) -> dict:
    """Tokenise non-blank docs (no BOS/EOS) into out_dir/shard-*.tar and write out_dir/index.json; returns the index."""
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tokenizer, out = Path(tokenizer).resolve(), Path(out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    # index.json marks a complete output: remove it first so an interrupted run is never mistaken for one.
    for stale in [out / "index.json", *out.glob("shard-*.tar")]:
        stale.unlink(missing_ok=True)
    writer, key = _ShardWriter(out, shard_tokens), 0
    docs_iter = iter(docs)
    with tqdm(desc=f"shards {out.name}", unit="doc", disable=not progress) as bar:
        while chunk := list(itertools.islice(docs_iter, CHUNK_DOCS)):
            for text, ids in zip(chunk, sp.encode(chunk, out_type=int)):
                if text.strip():  # a blank document would be a lone EOS in training
                    writer.write(f"{key:09d}", ids)
                    key += 1
            bar.update(len(chunk))
    writer.close()
    if not writer.shards:
        raise ValueError(f"no non-empty documents to write into {out}")
    index = {"format": FORMAT, "tokenizer": str(tokenizer), "eos_id": sp.eos_id(),
             "vocab_size": sp.get_piece_size(), "shards": writer.shards}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or folders of them")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece PREFIX.model")
    ap.add_argument("--out", required=True, help="output folder for shards and index.json")
    ap.add_argument("--shard-tokens", type=int, default=1 << 20, help="roll over to a new shard at ~N tokens")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    args = ap.parse_args()
    index = write_shards(iter_documents(args.input, args.text_key), args.tokenizer, args.out, args.shard_tokens)
    print(f"wrote {len(index['shards'])} shards, {sum(s['tokens'] for s in index['shards'])} tokens to {args.out}")


if __name__ == "__main__":
    main()
