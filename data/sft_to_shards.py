"""Tokenise chat-style JSONL into webdataset SFT shards of KEY.prompt.npy + KEY.response.npy and an index.json.

A record is {"prompt": str, "response": str} or {"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]}; a prompt/response record is the chat [user prompt, assistant response]. A
conversation gives one sample per assistant turn i, its prompt made of every earlier turn.

--tokenizer is a sentencepiece PREFIX.model or a local transformers tokenizer folder (AutoTokenizer, never
the hub). When the folder has a chat template, the template decides the tokens (LLaDA's SFT layout):

- prompt = apply_chat_template(messages[:i], add_generation_prompt=True): every earlier turn as the
  template renders it, up to and including the assistant header;
- response = the rest of apply_chat_template(messages[:i+1]): the assistant content and the template's
  end-of-turn token(s); a template whose rendering of messages[:i+1] does not start with that prompt
  (e.g. one that rewrites earlier turns) makes the record bad.

Otherwise (a sentencepiece model, or a folder without a chat template) the plain template (TEMPLATE in
index.json) applies:

- consecutive system/user turns are joined with a newline and encoded as one text;
- an earlier assistant turn is encoded on its own and followed by EOS, as the model learns to end answers.

So [user P, assistant R] gives exactly the tokens of {"prompt": P, "response": R}. No BOS or EOS is added
around a sample beyond what a chat template renders: the loader (framework/data/sft.py) appends one EOS to
the answer and pads the row with EOS, both supervised (index.json "pad_policy"), with the tokenizer's
eos_id stored in index.json, so training ends and pads rows with the id the tokenizer decodes as EOS.

A bad record (invalid JSON, missing or mistyped keys, an empty response, no assistant turn, a chat
template that fails on it) is reported as FILE:LINE and counted, and so is a sample longer than --max-len
tokens (prompt + response + EOS); neither stops the tool.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import webdataset as wds
from tqdm import tqdm

FORMAT = "sft-v1"
TEMPLATE = "system/user turns joined by newline; each earlier assistant turn followed by EOS"
CHAT_TEMPLATE = ("tokenizer chat template (sha256 {sha}): prompt = messages[:i] with the generation prompt, "
                 "response = the rest of messages[:i+1]")
# How SFTStream fills a row; recorded so a reader of the index knows which id ends and pads the answers.
PAD_POLICY = "prompt, response, then eos_id to seq_len; the first EOS and the padding are answer (supervised)"
ROLES = ("system", "user", "assistant")
SAMPLES_PER_SHARD = 2048  # 20000 task samples -> 10 shards: two ranks still get several each
MAX_REPORTS = 20  # bad records printed in full by the CLI; the rest are only counted


class BadRecord(ValueError):
    """A record that cannot become a sample; the message says why."""


def list_jsonl(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted so the output never depends on the file system)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.jsonl") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input path {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {[str(p) for p in paths]}")
    return files


def conversation_turns(record: object) -> list[tuple[str, str]]:
    """(role, content) turns of a record in either form; raises BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise BadRecord(f"messages[{i}] needs a 'role' in {ROLES} and a string 'content'")
            turns.append((m["role"], m["content"]))
    else:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise BadRecord(f"missing string field {key!r} (or a 'messages' list)")
        turns = [("user", record["prompt"]), ("assistant", record["response"])]
    if not any(role == "assistant" for role, _ in turns):
        raise BadRecord("no assistant turn")
    for i, (role, content) in enumerate(turns):
        if role == "assistant" and not content.strip():
            raise BadRecord(f"empty response (assistant turn {i})")
    return turns


Samples = list[tuple[list[int], list[int]]]  # (prompt ids, response ids), one per assistant turn


def encode_samples(turns: list[tuple[str, str]], encode: Callable[[str], list[int]], eos_id: int) -> Samples:
    """(prompt ids, response ids) for each assistant turn, by the plain TEMPLATE."""
    samples, prompt, pending = [], [], []  # pending: system/user texts since the last assistant turn
    for role, content in turns:
        if role != "assistant":
            pending.append(content)
            continue
        if pending:
            prompt = prompt + encode("\n".join(pending))
            pending = []
        response = encode(content)
        samples.append((prompt, response))
        prompt = prompt + response + [eos_id]
    return samples


def chat_samples(turns: list[tuple[str, str]], tokenizer) -> Samples:
    """(prompt ids, response ids) for each assistant turn by the transformers tokenizer's chat template:
    prompt + response is exactly the template's rendering of the conversation up to that turn."""
    messages = [{"role": role, "content": content} for role, content in turns]
    samples = []
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise BadRecord(f"the chat template's rendering of messages[:{i + 1}] does not extend its "
                            f"rendering of messages[:{i}] with the generation prompt: turn {i} has no clean answer")
        samples.append((prompt, full[len(prompt):]))
    return samples


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                            return_dict=False)
    except (TemplateError, ValueError, TypeError) as e:  # e.g. raise_exception("roles must alternate")
        raise BadRecord(f"chat template failed: {e}") from None
    return [int(t) for t in ids]


@dataclass(frozen=True)
class Tokenizer:
    """What the tool needs of a tokenizer: samples of a conversation and the ids index.json records."""

    samples: Callable[[list[tuple[str, str]]], Samples]
    template: str
    ids: dict  # tokenizer_kind, eos_id, pad_id, bos_id, mask_id, vocab_size


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece PREFIX.model file or a local transformers tokenizer folder."""
    path = Path(path)
    if path.is_dir():
        return _transformers_tokenizer(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist (give a sentencepiece .model or a "
                                f"transformers tokenizer folder)")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return Tokenizer(samples=lambda turns: encode_samples(turns, sp.encode, sp.eos_id()), template=TEMPLATE,
                     ids={"tokenizer_kind": "sentencepiece", "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
                          "bos_id": sp.bos_id(), "mask_id": _mask_id(sp), "vocab_size": sp.get_piece_size()})


def _transformers_tokenizer(folder: Path) -> Tokenizer:
    # Imported only here: it takes seconds, and the sentencepiece path never needs it.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        # transformers' messages span lines; the CLI's error stays one line.
        raise ValueError(f"tokenizer folder {folder} is not a loadable transformers tokenizer: "
                         f"{' '.join(str(e).split())}") from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer folder {folder} has no eos_token: SFT rows end and are padded with EOS, "
                         f"so set eos_token in its tokenizer_config.json")
    ids = {"tokenizer_kind": "transformers", "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
           "bos_id": tok.bos_token_id, "mask_id": tok.mask_token_id, "vocab_size": len(tok)}
    template = getattr(tok, "chat_template", None)
    if template:  # a str, or a dict of named templates whose "default" apply_chat_template uses
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return Tokenizer(samples=lambda turns: chat_samples(turns, tok),
                         template=CHAT_TEMPLATE.format(sha=sha), ids=ids)
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731 - plain text, no BOS/EOS
    return Tokenizer(samples=lambda turns: encode_samples(turns, encode, tok.eos_token_id), template=TEMPLATE,
                     ids=ids)


def _npy_bytes(ids: list[int]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


class _ShardWriter:
    """Rolls over to a new shard-NNNNNN.tar every samples_per_shard samples; counts lengths per shard."""

    def __init__(self, out_dir: Path, samples_per_shard: int) -> None:
        self.out_dir, self.samples_per_shard = out_dir, samples_per_shard
        self.shards: list[dict] = []
        self.lengths: Counter[int] = Counter()
        self.writer: wds.TarWriter | None = None

    def write(self, key: str, prompt: list[int], response: list[int]) -> None:
        if self.writer is None:
            name = f"shard-{len(self.shards):06d}.tar"
            # mtime=0 and fixed owner make the tar bytes a pure function of the input.
            self.writer = wds.TarWriter(str(self.out_dir / name), mtime=0, user="", group="", encoder=False)
            self.shards.append({"path": name, "samples": 0, "tokens": 0, "prompt_tokens": 0, "response_tokens": 0})
        self.writer.write({"__key__": key, "prompt.npy": _npy_bytes(prompt), "response.npy": _npy_bytes(response)})
        shard = self.shards[-1]
        shard["samples"] += 1
        shard["tokens"] += len(prompt) + len(response)
        shard["prompt_tokens"] += len(prompt)
        shard["response_tokens"] += len(response)
        self.lengths[len(prompt) + len(response) + 1] += 1
        if shard["samples"] >= self.samples_per_shard:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            # [[length, count], ...] with length = prompt + response + EOS: the loader counts, from the index
            # alone, how many samples fit its seq_len.
            self.shards[-1]["lengths"] = sorted(map(list, self.lengths.items()))
            self.lengths = Counter()


def _stderr(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def write_sft_shards(inputs: Iterable[str | Path], tokenizer: str | Path, out_dir: str | Path,
                     samples_per_shard: int = SAMPLES_PER_SHARD, max_len: int | None = None,
                     report: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Write out_dir/shard-*.tar and out_dir/index.json from JSONL files; returns the index.

    report gets one "FILE:LINE: reason" message per bad record or too-long sample (default: the first
    MAX_REPORTS go to stderr); their counts are in the index as "bad_records" and "too_long".
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be at least 2 (one response token and EOS), got {max_len}")
    files = list_jsonl(inputs)
    tokenizer, out = Path(tokenizer).resolve(), Path(out_dir)
    tok = load_tokenizer(tokenizer)
    if report is None:
        report = _limited(_stderr, MAX_REPORTS)
    out.mkdir(parents=True, exist_ok=True)
    # index.json marks a complete output: remove it first so an interrupted run is never mistaken for one.
    for stale in [out / "index.json", *out.glob("shard-*.tar")]:
        stale.unlink(missing_ok=True)
    writer, counts = _ShardWriter(out, samples_per_shard), Counter()
    with tqdm(desc=f"sft shards {out.name}", unit="rec", disable=not progress) as bar:
        for where, pairs in _read_records(files, tok.samples, report, counts):
            for turn, (prompt, response) in enumerate(pairs):
                length = len(prompt) + len(response) + 1
                if max_len is not None and length > max_len:
                    report(f"{where}: sample {turn} has {length} tokens (prompt + response + EOS) > "
                           f"max_len {max_len}; left out")
                    counts["too_long"] += 1
                    continue
                writer.write(f"{counts['samples']:09d}", prompt, response)
                counts["samples"] += 1
            bar.update(1)
            bar.set_postfix_str(f"samples={counts['samples']} bad={counts['bad_records']} "
                                f"too_long={counts['too_long']}", refresh=False)
    writer.close()
    if not writer.shards:
        raise ValueError(f"no valid samples in {[str(f) for f in files]} ({counts['bad_records']} bad records, "
                         f"{counts['too_long']} too long)")
    index = {"format": FORMAT, "tokenizer": str(tokenizer), "template": tok.template, **tok.ids,
             "pad_policy": PAD_POLICY, "max_len": max_len, "records": counts["records"],
             "samples": counts["samples"], "bad_records": counts["bad_records"], "too_long": counts["too_long"],
             "shards": writer.shards}
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return index


def _read_records(files: list[Path], encode: Callable[[list[tuple[str, str]]], Samples],
                  report: Callable[[str], None], counts: Counter) -> Iterator[tuple[str, Samples]]:
    """("FILE:LINE", encoded samples) for every good record; bad ones are reported and counted."""
    for f in files:
        with f.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                counts["records"] += 1
                try:
                    pairs = encode(conversation_turns(json.loads(line.decode("utf-8"))))
                except UnicodeDecodeError as e:
                    reason = f"not UTF-8 ({e})"
                except json.JSONDecodeError as e:
                    reason = f"not valid JSON ({e})"
                except BadRecord as e:
                    reason = str(e)
                else:
                    yield f"{f}:{n}", pairs
                    continue
                report(f"{f}:{n}: {reason}; left out")
                counts["bad_records"] += 1


def _mask_id(sp: spm.SentencePieceProcessor) -> int | None:
    mask = sp.piece_to_id("<mask>")
    return None if mask == sp.unk_id() else mask


def _limited(report: Callable[[str], None], limit: int) -> Callable[[str], None]:
    seen = 0

    def limited(message: str) -> None:
        nonlocal seen
        seen += 1
        if seen <= limit:
            report(message)
        elif seen == limit + 1:
            report("... more problems are only counted (see the summary and index.json)")

    return limited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help=".jsonl files or folders of them")
    ap.add_argument("--tokenizer", required=True,
                    help="sentencepiece PREFIX.model, or a local transformers tokenizer folder (its chat template, "
                         "if any, lays out the samples)")
    ap.add_argument("--out", required=True, help="output folder for shards and index.json")
    ap.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD)
    ap.add_argument("--max-len", type=int, help="leave out samples longer than N tokens (prompt + response + EOS)")
    args = ap.parse_args()
    try:
        index = write_sft_shards(args.input, args.tokenizer, args.out, args.samples_per_shard, args.max_len)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shards to {args.out} "
          f"({index['records']} records, {index['bad_records']} bad, {index['too_long']} too long)")


if __name__ == "__main__":
    main()
