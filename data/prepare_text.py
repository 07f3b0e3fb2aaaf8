"""One command from text files (or the default corpus) to a tokenizer plus train/val token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_tokenizer import train_tokenizer
from documents import iter_documents
from fetch_default_corpus import DEFAULT_CACHE, fetch_default_corpus
from text_to_shards import write_shards


def split_holdout(docs: list[str], fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministically hold out ~fraction of docs, evenly spaced (at least one): returns (train, val)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to hold out a validation split, got {len(docs)}")
    k = max(1, round(len(docs) * fraction))
    held = {(2 * j + 1) * len(docs) // (2 * k) for j in range(k)}
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


def auto_shard_tokens(docs: list[str], target_shards: int = 32) -> int:
    """Shard size giving ~target_shards shards (at ~4 characters a token), so small corpora still split
    across many ranks, clamped to [1024, 2**20] tokens."""
    return min(1 << 20, max(1024, sum(map(len, docs)) // (4 * target_shards)))


def load_splits(out: Path, inputs: list[str] | None, val_inputs: list[str] | None, text_key: str,
                cache: Path) -> tuple[list[str], list[str]]:
    """Return (train, val) documents from the user's inputs, or from the default corpus in out/corpus."""
    if not inputs:
        corpus = out / "corpus"
        if not ((corpus / "train.jsonl").is_file() and (corpus / "val.jsonl").is_file()):
            fetch_default_corpus(corpus, cache)
        inputs, val_inputs = [str(corpus / "train.jsonl")], [str(corpus / "val.jsonl")]
    docs = list(iter_documents(inputs, text_key))
    if val_inputs:
        return docs, list(iter_documents(val_inputs, text_key))
    return split_holdout(docs)


def prepare_text(out: Path, inputs: list[str] | None = None, val_inputs: list[str] | None = None,
                 vocab_size: int = 2000, model_type: str = "unigram", shard_tokens: int | None = None,
                 text_key: str = "text", force: bool = False, cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Build out/tokenizer.{model,vocab,json}, out/train and out/val; skip finished steps unless force."""
    paths = {"tokenizer": out / "tokenizer.model", "train": out / "train", "val": out / "val"}
    todo_tok = force or not (out / "tokenizer.json").is_file()  # .json is written last: it marks completion
    todo = {s: todo_tok or force or not (paths[s] / "index.json").is_file() for s in ("train", "val")}
    if not (todo_tok or any(todo.values())):
        print("all outputs exist; pass --force to rebuild")
        return paths
    train, val = load_splits(out, inputs, val_inputs, text_key, cache)
    print(f"{len(train)} train and {len(val)} val documents")
    if todo_tok:
        train_tokenizer(train, out / "tokenizer", vocab_size, model_type)
    for split, docs in (("train", train), ("val", val)):
        if todo[split]:
            write_shards(docs, paths["tokenizer"], paths[split], shard_tokens or auto_shard_tokens(docs))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--input", nargs="+", help=".txt/.jsonl files or folders (default: the Lee news corpus)")
    ap.add_argument("--val-input", nargs="+", help="validation files (default: hold out ~5%% of --input)")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--shard-tokens", type=int, help="roll over at ~N tokens (default: ~32 shards a split)")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the default corpus wheel is kept")
    ap.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    args = ap.parse_args()
    if args.val_input and not args.input:
        ap.error("--val-input needs --input")
    try:
        paths = prepare_text(args.out, args.input, args.val_input, args.vocab_size, args.model_type,
                             args.shard_tokens, args.text_key, args.force, args.cache)
    except (RuntimeError, ValueError, FileNotFoundError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
