"""The LLaDA recipe's tokenizer: data.dir's sentencepiece model, or a transformers tokenizer folder.

One object serves prompts, sampling, evaluation and exact match, and gives the ids the run must agree with
(EOS, the left padding of prompts, the mask, the vocabulary size). Which tokenizer (`source`):
- `data.tokenizer=FOLDER`: that transformers tokenizer folder (local, AutoTokenizer, no remote code);
- else data.dir's own `tokenizer.json` + `tokenizer.model` (data/prepare_text.py, data/make_tasks.py);
- else, for a dataset without one (SFT shards from `data/sft_to_shards.py --tokenizer FOLDER`), the
  tokenizer of `train.init_from` when that is a LLaDA-layout folder (its `tokenizer.json`);
- else, when `train.init_from` is a transformers Llama / Qwen2 folder (an autoregressive model adapted to
  masked diffusion), that folder's tokenizer with a mask token: its own `mask_token` if it has one, else
  `<|mdm_mask|>` added as the mask token at id len(tokenizer) (`plan_mask` says whether that id is a spare
  embedding row or one more row). The result is saved once in RUN_DIR/tokenizer, which sampling, evaluation
  and export of the run read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# LLaDA's mask token; its tokenizer may not register it as `mask_token`.
LLADA_MASK_TOKEN = "<|mdm_mask|>"
# The files of a transformers tokenizer folder an export copies (those present).
TRANSFORMERS_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                "added_tokens.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                                "merges.txt")
# Written beside an adapted tokenizer (RUN_DIR/tokenizer): where it came from and what was added.
ADAPTED_MARKER = "difftrain_mask.json"


@dataclass(frozen=True)
class TextTokenizer:
    kind: str  # "sentencepiece" or "transformers"
    source: str  # the file or folder, for messages
    eos_id: int
    pad_id: int  # left padding of batched prompts (never attended)
    mask_id: int | None
    vocab_size: int
    encode_prompt: Callable[[str], list[int]]  # a sample prompt as the SFT data laid prompts out
    decode: Callable[[list[int]], str]  # answer ids -> text (ids past the tokenizer read as unknown)
    # An adapted tokenizer's size before the mask token was added: shards written with the source folder's
    # own tokenizer (which had no mask token) hold the same ids.
    base_vocab_size: int | None = None


@dataclass(frozen=True)
class MaskPlan:
    """Where the mask token of an imported autoregressive model lives."""

    mask_id: int
    vocab_size: int  # embedding (and head) rows of the run: the source's, or one more
    added: bool  # the tokenizer gains <|mdm_mask|>
    base_len: int  # len(tokenizer) before


def plan_mask(existing: int | None, tokenizer_len: int, rows: int) -> MaskPlan:
    """The mask token for a tokenizer of `tokenizer_len` tokens over an embedding of `rows` rows: the tokenizer's
    own (`existing`), else a new token at id tokenizer_len, on a spare row when rows > tokenizer_len (Qwen2.5
    pads its embedding by ~270), else on one more row. ValueError when the ids cannot fit the embedding."""
    if existing is not None:
        if not 0 <= existing < rows:
            raise ValueError(f"the tokenizer's mask token id {existing} is outside the embedding ({rows} rows)")
        return MaskPlan(existing, rows, False, tokenizer_len)
    if tokenizer_len > rows:
        raise ValueError(f"the tokenizer has {tokenizer_len} tokens but the embedding only {rows} rows")
    return MaskPlan(tokenizer_len, max(rows, tokenizer_len + 1), True, tokenizer_len)


def tokenizer_source(data_dir: str, tokenizer: str, init_from: str | None) -> tuple[str, str] | None:
    """(kind, path) of the run's tokenizer by the order above; None when there is none. Kind "adapted": the
    path is the Llama / Qwen2 folder whose tokenizer `save_adapted` turns into the run's."""
    from framework.export import hf_ar_io, llada_io

    if tokenizer:
        return "transformers", tokenizer
    if (Path(data_dir) / "tokenizer.json").is_file():
        return "sentencepiece", data_dir
    if init_from and llada_io.is_llada_folder(init_from):
        return "transformers", init_from
    if init_from and hf_ar_io.is_ar_folder(init_from):
        return "adapted", init_from
    return None


def sentencepiece_tokenizer(data_dir: str) -> TextTokenizer:
    """data_dir/tokenizer.json (our ids) + data_dir/tokenizer.model; the model file is read on first use."""
    info = json.loads((Path(data_dir) / "tokenizer.json").read_text())
    model = Path(data_dir) / "tokenizer.model"
    loaded: list = []

    def sp():
        if not loaded:
            import sentencepiece as spm

            loaded.append(spm.SentencePieceProcessor(model_file=str(model)))
        return loaded[0]

    def decode(ids: list[int]) -> str:
        from recipes.llada.decoding import detokenize

        return detokenize(sp(), ids)

    return TextTokenizer("sentencepiece", str(model), info["eos_id"], max(int(info.get("pad_id", 0)), 0),
                         info["mask_id"], info["vocab_size"], lambda text: sp().encode(text), decode)


def load_folder_tokenizer(folder: str | Path):
    """AutoTokenizer of a local folder; ValueError (one line, naming the folder) when unusable."""
    if not Path(folder).is_dir():  # else transformers would take it for a hub name
        raise ValueError(f"{folder} is not a folder (a local transformers tokenizer folder is needed)")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a LLaDA folder's config.json (model_type llada) draws a warning otherwise
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' messages span lines
        raise ValueError(f"{folder} is not a loadable transformers tokenizer: {' '.join(str(e).split())}") from None
    finally:
        hf_logging.set_verbosity(level)
    if tok.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no eos_token (answers end and are padded with EOS)")
    return tok


def folder_mask_id(tok) -> int | None:
    """The tokenizer's mask token: `mask_token`, else LLaDA's <|mdm_mask|> when it has one."""
    return tok.mask_token_id if tok.mask_token_id is not None else tok.get_vocab().get(LLADA_MASK_TOKEN)


def adapt_tokenizer(folder: str | Path, rows: int):
    """(the folder's tokenizer with a mask token, its MaskPlan) for a model of `rows` embedding rows; in memory."""
    tok = load_folder_tokenizer(folder)
    plan = plan_mask(folder_mask_id(tok), len(tok), rows)
    if plan.added:
        tok.add_special_tokens({"mask_token": LLADA_MASK_TOKEN})
        if tok.mask_token_id != plan.mask_id:  # a tokenizer with holes in its ids would put it elsewhere
            raise ValueError(f"{folder}: {LLADA_MASK_TOKEN} was given id {tok.mask_token_id}, not the "
                             f"{plan.mask_id} expected after {plan.base_len} tokens")
    return tok, plan


def save_adapted(folder: str | Path, rows: int, out: str | Path) -> Path:
    """RUN_DIR/tokenizer (`out`): the adapted tokenizer of `folder`, written once (every rank may call this at
    the same time: each writes its own temporary folder and the first rename wins) and reused after."""
    out, source = Path(out), str(Path(folder).resolve())
    marker = out / ADAPTED_MARKER
    if marker.is_file():
        made_from = json.loads(marker.read_text()).get("source")
        if made_from != source:
            raise ValueError(f"{out} was adapted from {made_from}, not {source}; use another run_dir")
        return out
    tok, plan = adapt_tokenizer(folder, rows)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    (tmp / ADAPTED_MARKER).write_text(json.dumps({
        "source": source, "mask_token": tok.convert_ids_to_tokens(plan.mask_id), "mask_id": plan.mask_id,
        "added": plan.added, "base_vocab_size": plan.base_len, "vocab_size": plan.vocab_size}, indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another rank was first (or an older, markerless folder is in the way)
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise ValueError(f"{out} exists but holds no adapted tokenizer ({ADAPTED_MARKER}); remove it") from None
    return out


def transformers_tokenizer(folder: str) -> TextTokenizer:
    """A local transformers tokenizer folder; ValueError (one line, naming the folder) when unusable."""
    tok = load_folder_tokenizer(folder)
    mask = folder_mask_id(tok)
    size = len(tok)
    marker = Path(folder) / ADAPTED_MARKER
    base = json.loads(marker.read_text())["base_vocab_size"] if marker.is_file() else None
    unknown = tok.unk_token_id

    def decode(ids: list[int]) -> str:
        # The model's vocabulary may be padded past the tokenizer's; those ids decode as unknown (or nothing).
        ids = [i if 0 <= i < size else unknown for i in ids]
        return tok.decode([i for i in ids if i is not None], skip_special_tokens=True)

    template = getattr(tok, "chat_template", None)

    def encode_prompt(text: str) -> list[int]:
        # As data/sft_to_shards.py laid out a one-turn prompt: the chat template with its generation prompt
        # (the assistant header), or the plain text without BOS/EOS.
        if template:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            return [int(t) for t in ids]
        return tok.encode(text, add_special_tokens=False)

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TextTokenizer("transformers", str(folder), tok.eos_token_id, pad, mask, size, encode_prompt, decode,
                         base)
