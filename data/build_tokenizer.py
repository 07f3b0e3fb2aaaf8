"""Train a sentencepiece tokenizer with the ids the masked-diffusion recipes expect."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from documents import ENCODING_ERRORS, iter_documents

MASK_PIECE = "<mask>"
# sentencepiece drops longer "sentences"; chunk lines so no text is silently left out of training.
MAX_CHARS = 8192


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    for doc in docs:
        for line in doc.splitlines():
            for start in range(0, len(line), MAX_CHARS):
                if line[start:start + MAX_CHARS].strip():
                    yield line[start:start + MAX_CHARS]


def train_tokenizer(docs: Iterable[str], prefix: str | Path, vocab_size: int = 2000, model_type: str = "unigram",
                    split_digits: bool = False, byte_fallback: bool = True) -> dict[str, int]:
    """Train on documents; write PREFIX.model, PREFIX.vocab, PREFIX.json and return the json's ids.

    split_digits makes every digit its own piece (arithmetic then sees one token per digit, never "482").
    byte_fallback=False drops the 256 byte pieces, so a vocabulary of ~100 is possible for small
    synthetic alphabets; a character the training text never had then encodes as unk.
    """
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(docs), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            user_defined_symbols=[MASK_PIECE], byte_fallback=byte_fallback, hard_vocab_limit=False,
            # Without byte pieces a character left out of the vocabulary could only be unk: keep them all.
            split_digits=split_digits, character_coverage=0.9995 if byte_fallback else 1.0,
            # Keep newlines and repeated spaces: generated text should round-trip its layout.
            normalization_rule_name="nfkc", remove_extra_whitespaces=False,
            max_sentence_length=4 * MAX_CHARS, minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    meta = {"vocab_size": sp.get_piece_size(), "pad_id": sp.pad_id(), "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "mask_id": sp.piece_to_id(MASK_PIECE)}
    Path(f"{prefix}.model").write_bytes(model.getvalue())
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size()))
    Path(f"{prefix}.vocab").write_text(vocab, encoding="utf-8")
    Path(f"{prefix}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", nargs="+", required=True, help=".txt/.jsonl files or folders of them")
    ap.add_argument("--out", required=True, help="output prefix: writes PREFIX.model/.vocab/.json")
    ap.add_argument("--vocab-size", type=int, default=2000)
    ap.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--text-key", default="text", help="field holding the text in .jsonl records")
    ap.add_argument("--split-digits", action="store_true", help="every digit is its own piece")
    ap.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                    help="no byte pieces (allows a tiny vocabulary; unseen characters become unk)")
    ap.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                    help="non-UTF-8 input: stop naming it, leave it out (skip) or decode bad bytes as U+FFFD")
    args = ap.parse_args()
    try:
        # A list first: a bad file must fail here, naming it, not inside sentencepiece's trainer.
        meta = train_tokenizer(list(iter_documents(args.input, args.text_key, args.encoding_errors)), args.out,
                               args.vocab_size, args.model_type, args.split_digits, args.byte_fallback)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}.model: {meta}")


if __name__ == "__main__":
    main()
