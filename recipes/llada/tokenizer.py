"""The LLaDA recipe's tokenizer: data.dir's sentencepiece model, or a transformers tokenizer folder.

One object serves prompts, sampling, evaluation and exact match, and gives the ids the run must agree with
(EOS, the left padding of prompts, the mask, the vocabulary size). Which tokenizer (`source`):
- `data.tokenizer=FOLDER`: that transformers tokenizer folder (local, AutoTokenizer, no remote code);
- else data.dir's own `tokenizer.json` + `tokenizer.model` (data/prepare_text.py, data/make_tasks.py);
- else, for a dataset without one (SFT shards from `data/sft_to_shards.py --tokenizer FOLDER`), the
  tokenizer of `train.init_from` when that is a LLaDA-layout folder (its `tokenizer.json`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# LLaDA's mask token; its tokenizer may not register it as `mask_token`.
LLADA_MASK_TOKEN = "<|mdm_mask|>"
# The files of a transformers tokenizer folder an export copies (those present).
TRANSFORMERS_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                "added_tokens.json", "chat_template.jinja", "tokenizer.model", "vocab.json",
                                "merges.txt")


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


def tokenizer_source(data_dir: str, tokenizer: str, init_from: str | None) -> tuple[str, str] | None:
    """(kind, path) of the run's tokenizer by the order above; None when there is none."""
    from framework.export import llada_io

    if tokenizer:
        return "transformers", tokenizer
    if (Path(data_dir) / "tokenizer.json").is_file():
        return "sentencepiece", data_dir
    if init_from and llada_io.is_llada_folder(init_from):
        return "transformers", init_from
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


def transformers_tokenizer(folder: str) -> TextTokenizer:
    """A local transformers tokenizer folder; ValueError (one line, naming the folder) when unusable."""
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
    mask = tok.mask_token_id if tok.mask_token_id is not None else tok.get_vocab().get(LLADA_MASK_TOKEN)
    size = len(tok)
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
    return TextTokenizer("transformers", str(folder), tok.eos_token_id, pad, mask, size, encode_prompt, decode)
