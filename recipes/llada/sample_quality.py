"""Does a sample read? Pure measures of generated text: the share of its words that the training text
has, and the longest run of one repeated token. A garbage sample (`->ssssssss...`, `the the the`, made-up
fragments) scores low on the first or high on the second; fluent text copied from a corpus scores well.

Words are lower-cased runs of letters (an inner apostrophe kept: "didn't"); numbers and punctuation are
not words. `training_words` reads the vocabulary from the train shards (the only I/O here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
SINGLE_LETTER_WORDS = frozenset({"a", "i"})


def words(text: str) -> list[str]:
    """The lower-cased words of text, in order."""
    return [w.lower() for w in WORD.findall(text)]


def known_words(text: str, vocabulary: frozenset[str] | set[str]) -> tuple[int, int]:
    """(words of text found in vocabulary, words of text). A lone letter other than "a" and "i" is never
    known: "U.S." puts "s" in the vocabulary, and a weak model's favourite output is that very fragment."""
    found = words(text)
    return sum(w in vocabulary and (len(w) > 1 or w in SINGLE_LETTER_WORDS) for w in found), len(found)


def longest_run(items: Sequence) -> int:
    """Length of the longest run of one repeated item (token id, character, word); 0 for nothing."""
    best = run = 0
    for i, item in enumerate(items):
        run = run + 1 if i and item == items[i - 1] else 1
        best = max(best, run)
    return best


def sample_scores(text: str, token_ids: Sequence[int], vocabulary: frozenset[str] | set[str]) -> dict[str, float]:
    """One sample's measures: known_words (share; 0 when it has no word at all, as garbage has none) and
    longest_repeat (tokens)."""
    known, total = known_words(text, vocabulary)
    return {"known_words": known / total if total else 0.0, "longest_repeat": float(longest_run(token_ids)),
            "words": float(total), "known": float(known)}


def summarize(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    """Over samples: the share of all generated words that are known (pooled, so a 2-word sample weighs
    less than a 30-word one) and the worst longest_repeat."""
    scores = list(scores)
    total = sum(s["words"] for s in scores)
    return {"sample_known_words": sum(s["known"] for s in scores) / total if total else 0.0,
            "sample_longest_repeat": max((s["longest_repeat"] for s in scores), default=0.0)}


def annotate(line: str, score: dict[str, float]) -> str:
    """A sample line with its measures appended, as the trainer prints it."""
    return f"{line}  [known words {score['known_words']:.0%}, longest repeat {score['longest_repeat']:.0f}]"


@lru_cache(maxsize=4)
def training_words(data_dir: str, max_tokens: int = 4_000_000) -> frozenset[str]:
    """The words of data_dir/train (decoded from its shards with data_dir/tokenizer.model), reading shards
    in index order until max_tokens: all of a CPU-sized corpus, a sample of a huge one. Cached per folder."""
    import numpy as np
    import sentencepiece as spm

    from framework.data.shards import CorruptShardError, decode_npy, load_index, read_tar_samples

    sp = spm.SentencePieceProcessor(model_file=str(Path(data_dir) / "tokenizer.model"))
    index = load_index(Path(data_dir) / "train")
    vocabulary: set[str] = set()
    read = 0
    for shard in index["shards"]:
        if read >= max_tokens:
            break
        path = Path(index["root"]) / shard["path"]
        try:
            ids = [np.asarray(decode_npy(s["tokens.npy"], path)).tolist()
                   for s in read_tar_samples(path, shard["samples"]) if "tokens.npy" in s]
        except CorruptShardError:
            continue  # the loader warns about it during training; a vocabulary without it is still one
        vocabulary.update(w for text in sp.decode(ids) for w in words(text))
        read += sum(map(len, ids))
    return frozenset(vocabulary)
