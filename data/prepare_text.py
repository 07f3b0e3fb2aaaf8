"""One command from text files (or the default corpus) to a tokenizer plus train/val token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_tokenizer import train_tokenizer
from documents import ENCODING_ERRORS, chunk_document, iter_documents
from fetch_default_corpus import DEFAULT_CACHE, fetch_default_corpus
from text_to_shards import write_shards


def split_holdout(docs: list[str], fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministically hold out ~fraction of docs, evenly spaced (at least one): returns (train, val)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to hold out a validation split, got {len(docs)}")
    k = max(1, round(len(docs) * fraction))
    held = {(2 * j + 1) * len(docs) // (2 * k) for j in range(k)}
    return ([d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held])


TARGET_SHARDS = 64  # shards per split: enough for the ranks (x loader workers) a user is likely to run
MIN_SHARD_TOKENS = 256  # below this a split gets fewer shards rather than tars of a few sentences
SAMPLE_CHARS = 1 << 20  # text encoded to measure characters per token


def shard_plan(total_tokens: float, target_shards: int = TARGET_SHARDS) -> int:
    """Tokens per shard for a split of ~total_tokens, also the longest chunk (longer documents are cut).
    A shard rolls over once it holds s tokens, so it holds fewer than 2 s: s = total / (2.2 target) gives
    at least 1.1 target shards (a margin for the estimated total) and at most ~2.2 target."""
    return min(1 << 20, max(MIN_SHARD_TOKENS, int(total_tokens / (2.2 * target_shards))))


def chars_per_token(docs: list[str], tokenizer: Path, sample_chars: int = SAMPLE_CHARS) -> float:
    """Characters per token of docs, measured on up to sample_chars of evenly spaced documents."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    total = sum(map(len, docs))
    every = max(1, round(total / sample_chars)) if total > sample_chars else 1
    sample = [d[:sample_chars] for d in docs[::every]]
    tokens = sum(map(len, sp.encode(sample)))
    return sum(map(len, sample)) / tokens if tokens else 4.0  # no text: write_shards will say so


def chunk_documents(docs: list[str], max_chars: int) -> list[tuple[int, str]]:
    """(document id, chunk) pairs: documents longer than max_chars cut at paragraph breaks; ids = positions."""
    return [(i, chunk) for i, doc in enumerate(docs) for chunk in chunk_document(doc, max_chars)]


def write_split(name: str, docs: list[str], tokenizer: Path, out: Path, shard_tokens: int | None,
                target_shards: int) -> dict:
    """Chunk and shard one split so it has >= target_shards shards where its size allows; says what it did."""
    cpt = chars_per_token(docs, tokenizer)
    size = shard_tokens or shard_plan(sum(map(len, docs)) / cpt, target_shards)
    max_chars = max(1, int(size * cpt))  # a chunk of about one shard: shards stay near their size
    chunks = chunk_documents(docs, max_chars)
    index = write_shards(chunks, tokenizer, out, size)
    n, tokens = len(index["shards"]), sum(s["tokens"] for s in index["shards"])
    why = f"--shard-tokens {size}" if shard_tokens else f"shards hold at least {MIN_SHARD_TOKENS} tokens"
    fewer = "" if n >= target_shards else \
        f"; fewer than {target_shards} ({why}), so at most {n} ranks x loader workers can read this split"
    print(f"{name}: {len(docs)} documents -> {len(chunks)} chunks (cut at paragraph breaks above {max_chars} "
          f"characters, document ids kept) -> {n} shards of ~{size} tokens, {tokens} tokens{fewer}")
    return index


def load_splits(out: Path, inputs: list[str] | None, val_inputs: list[str] | None, text_key: str,
                cache: Path, errors: str = "strict") -> tuple[list[str], list[str]]:
    """Return (train, val) documents from the user's inputs, or from the default corpus in out/corpus."""
    if not inputs:
        corpus = out / "corpus"
        if not ((corpus / "train.jsonl").is_file() and (corpus / "val.jsonl").is_file()):
            fetch_default_corpus(corpus, cache)
        inputs, val_inputs = [str(corpus / "train.jsonl")], [str(corpus / "val.jsonl")]
    skipped: list[str] = []
    docs = list(iter_documents(inputs, text_key, errors, skipped))
    val = list(iter_documents(val_inputs, text_key, errors, skipped)) if val_inputs else None
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} non-UTF-8 input(s) (--encoding-errors skip): {shown}")
    return (docs, val) if val is not None else split_holdout(docs)


def prepare_text(out: Path, inputs: list[str] | None = None, val_inputs: list[str] | None = None,
                 vocab_size: int = 2000, model_type: str = "unigram", shard_tokens: int | None = None,
                 text_key: str = "text", force: bool = False, cache: Path = DEFAULT_CACHE,
                 encoding_errors: str = "strict", target_shards: int = TARGET_SHARDS) -> dict[str, Path]:
    """Build out/tokenizer.{model,vocab,json}, out/train and out/val; skip finished steps unless force."""
    paths = {"tokenizer": out / "tokenizer.model", "train": out / "train", "val": out / "val"}
    todo_tok = force or not (out / "tokenizer.json").is_file()  # .json is written last: it marks completion
    todo = {s: todo_tok or force or not (paths[s] / "index.json").is_file() for s in ("train", "val")}
    if not (todo_tok or any(todo.values())):
        print("all outputs exist; pass --force to rebuild")
        return paths
    train, val = load_splits(out, inputs, val_inputs, text_key, cache, encoding_errors)
    print(f"{len(train)} train and {len(val)} val documents")
    if todo_tok:
        train_tokenizer(train, out / "tokenizer", vocab_size, model_type)
    for split, docs in (("train", train), ("val", val)):
        if todo[split]:
            write_split(split, docs, paths["tokenizer"], paths[split], shard_tokens, target_shards)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--input", nargs="+", help=".txt/.jsonl files or folders (default: the Lee news corpus)")
    ap.add_argument("--val-input", nargs="+", help="validation files (default: hold out ~5%% of --input)")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--shard-tokens", type=int, help="roll over at ~N tokens (default: >= --target-shards a split)")
    ap.add_argument("--target-shards", type=int, default=TARGET_SHARDS,
                    help="shards per split where the data allows (long documents are cut at paragraph breaks)")
    ap.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                    help="non-UTF-8 input: stop naming it (strict), leave that file or line out (skip), or "
                         "decode bad bytes as U+FFFD (replace)")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the default corpus wheel is kept")
    ap.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    args = ap.parse_args()
    if args.val_input and not args.input:
        ap.error("--val-input needs --input")
    if args.target_shards < 1 or (args.shard_tokens is not None and args.shard_tokens < 1):
        ap.error("--target-shards and --shard-tokens must be positive")
    try:
        paths = prepare_text(args.out, args.input, args.val_input, args.vocab_size, args.model_type,
                             args.shard_tokens, args.text_key, args.force, args.cache, args.encoding_errors,
                             args.target_shards)
    except (RuntimeError, ValueError, FileNotFoundError) as e:  # bad input: the message, not a traceback
        sys.exit(f"error: {e}")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
