"""Generate small verifiable tasks (exact-match answers) -> train/val JSONL, a tiny tokenizer and SFT shards.

Tasks, each a one-line prompt and a short answer that a ~1M-parameter masked diffusion model can learn on CPU:

    add      "add 482 + 97 ="        -> "579"        operands of 1..--max-digits digits
    sort     "sort 5 1 9 3 :"        -> "1 3 5 9"    --min-items..--max-items digits or letters
    reverse  "reverse a b c d :"     -> "d c b a"
    copy     "copy 7 2 9 :"          -> "7 2 9"

--fixed-width zero-pads addition ("add 482 + 097 =" -> "0579").

Everything is a pure function of --seed. Train records are drawn independently (a prompt may repeat); val
records are distinct and never appear in train, so val accuracy measures generalisation, not recall.
Outputs in OUT: train.jsonl, val.jsonl ({"task", "prompt", "response"}), tokenizer.model/.vocab/.json (digits
are single tokens), train/ and val/ (SFT shards written by sft_to_shards.py), tasks.json (the arguments).
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm
from build_tokenizer import train_tokenizer
from sft_to_shards import write_sft_shards
from tqdm import tqdm

TASKS = ("add", "sort", "reverse", "copy")
ALPHABETS = (string.digits, string.ascii_lowercase)  # list tasks draw all items from one of these
TARGET_SHARDS = 16  # shards per split, so 2 ranks x several workers each still get several
SPLITS = {"train": 0, "val": 1}  # the seed stream of each split


def make_task(task: str, rng: np.random.Generator, max_digits: int = 3, min_items: int = 3,
              max_items: int = 8, fixed_width: bool = False) -> dict[str, str]:
    """One record {"task", "prompt", "response"} of the named task. fixed_width zero-pads addition operands to
    max_digits and sums to max_digits + 1 ("add 482 + 097 =" -> "0579"), so every digit has a fixed place."""
    if task == "add":
        a, b = (_number(rng, max_digits) for _ in range(2))
        if fixed_width:
            return {"task": task, "prompt": f"add {a:0{max_digits}d} + {b:0{max_digits}d} =",
                    "response": f"{a + b:0{max_digits + 1}d}"}
        return {"task": task, "prompt": f"add {a} + {b} =", "response": str(a + b)}
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    alphabet = ALPHABETS[int(rng.integers(len(ALPHABETS)))]
    items = [alphabet[i] for i in rng.integers(len(alphabet), size=int(rng.integers(min_items, max_items + 1)))]
    answer = {"sort": sorted(items), "reverse": items[::-1], "copy": items}[task]
    return {"task": task, "prompt": f"{task} {' '.join(items)} :", "response": " ".join(answer)}


def _number(rng: np.random.Generator, max_digits: int) -> int:
    # Digit count first, then the value: short and long operands are equally common ("482 + 97").
    digits = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))


def generate(tasks: list[str], n: int, seed: int, split: str, exclude: set[str] | None = None,
             distinct: bool = False, **kwargs: int) -> list[dict[str, str]]:
    """n records, tasks chosen uniformly, from the (seed, split) stream; prompts in exclude are redrawn, and
    with distinct=True so are repeats. Raises ValueError when the task space is too small for that."""
    rng = np.random.default_rng([seed, SPLITS[split]])
    exclude = set(exclude or ())
    records: list[dict[str, str]] = []
    draws, limit = 0, 100 * n + 1000
    with tqdm(total=n, desc=f"tasks {split}", unit="rec", disable=n < 1000) as bar:
        while len(records) < n:
            draws += 1
            if draws > limit:
                raise ValueError(f"only {len(records)} of {n} {split} prompts could be drawn new after {limit} "
                                 f"draws: the task space is too small (raise --max-digits or --max-items)")
            record = make_task(tasks[int(rng.integers(len(tasks)))], rng, **kwargs)
            if record["prompt"] in exclude:
                continue
            if distinct:
                exclude.add(record["prompt"])
            records.append(record)
            bar.update(1)
    return records


def _texts(records: list[dict[str, str]]) -> Iterator[str]:
    for r in records:
        yield r["prompt"]
        yield r["response"]


def write_records(records: list[dict[str, str]], path: Path) -> None:
    """Write JSONL atomically (a half-written file is never left under the final name)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def make_tasks(out: Path, tasks: list[str] | tuple[str, ...] = TASKS, train: int = 20000, val: int = 200,
               seed: int = 0, max_digits: int = 3, min_items: int = 3, max_items: int = 8, vocab_size: int = 128,
               progress: bool = True, fixed_width: bool = False) -> dict[str, Path]:
    """Write every output into out (replacing earlier ones); returns their paths."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"--tasks {','.join(tasks)!r}: unknown {','.join(unknown) or 'none given'}; expected a "
                         f"comma-separated subset of {','.join(TASKS)}")
    if max_digits < 1 or not 1 <= min_items <= max_items:
        raise ValueError(f"need max_digits >= 1 and 1 <= min_items <= max_items, got {max_digits}, "
                         f"{min_items}, {max_items}")
    if train < 1 or val < 1:
        raise ValueError(f"need at least one train and one val record, got {train} and {val}")
    shape = {"max_digits": max_digits, "min_items": min_items, "max_items": max_items, "fixed_width": fixed_width}
    out.mkdir(parents=True, exist_ok=True)
    train_records = generate(tasks, train, seed, "train", **shape)
    val_records = generate(tasks, val, seed, "val", exclude={r["prompt"] for r in train_records}, distinct=True,
                           **shape)
    paths = {"train.jsonl": out / "train.jsonl", "val.jsonl": out / "val.jsonl",
             "tokenizer": out / "tokenizer.model", "train": out / "train", "val": out / "val"}
    write_records(train_records, paths["train.jsonl"])
    write_records(val_records, paths["val.jsonl"])
    # BPE keeps whole words ("▁reverse") in a ~100-piece vocabulary; split_digits makes each digit one token
    # and no byte pieces are needed for this alphabet.
    meta = train_tokenizer(_texts(train_records), out / "tokenizer", vocab_size, "bpe", split_digits=True,
                           byte_fallback=False)
    _check_no_unknown(paths["tokenizer"], val_records, meta["unk_id"])
    for split, records in (("train", train_records), ("val", val_records)):
        per_shard = math.ceil(len(records) / TARGET_SHARDS)
        index = write_sft_shards([paths[f"{split}.jsonl"]], paths["tokenizer"], paths[split], per_shard,
                                 progress=progress)
        if index["bad_records"]:  # a generator bug, never the user's input
            raise RuntimeError(f"{paths[split]}: {index['bad_records']} generated records were rejected")
    info = {"seed": seed, "tasks": tasks, "train": train, "val": val, **shape, "vocab_size": meta["vocab_size"]}
    (out / "tasks.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return paths


def _check_no_unknown(tokenizer: Path, records: list[dict[str, str]], unk_id: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    for r in records:
        for text in (r["prompt"], r["response"]):
            if unk_id in sp.encode(text):
                raise ValueError(f"{tokenizer} encodes {text!r} with unk: train holds too few records")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    ap.add_argument("--train", type=int, default=20000, help="train records")
    ap.add_argument("--val", type=int, default=200, help="val records (distinct, none in train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-digits", type=int, default=3, help="digits of each addition operand, at most")
    ap.add_argument("--min-items", type=int, default=3, help="list length of sort/reverse/copy, at least")
    ap.add_argument("--max-items", type=int, default=8, help="list length of sort/reverse/copy, at most")
    ap.add_argument("--vocab-size", type=int, default=128, help="tokenizer size, at most (BPE stops earlier)")
    ap.add_argument("--fixed-width", action="store_true",
                    help="zero-pad addition to --max-digits (sums to one more): with --min-items = --max-items "
                         "every answer token has a fixed place, which a tiny masked diffusion model learns far "
                         "sooner (see recipes/llada/configs/tasks_tiny.yaml)")
    args = ap.parse_args()
    try:
        paths = make_tasks(args.out, [t.strip() for t in args.tasks.split(",") if t.strip()], args.train, args.val,
                           args.seed, args.max_digits, args.min_items, args.max_items, args.vocab_size,
                           fixed_width=args.fixed_width)
    except (ValueError, RuntimeError) as e:  # bad arguments: the message, not a traceback
        sys.exit(f"error: {e}")
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
