"""Tiny random T5-family text encoders for tests, built offline: a sentencepiece unigram model trained on a few
lines, wrapped in transformers' T5Tokenizer, and a randomly initialised UMT5EncoderModel sized to it.

`write_umt5(folder)` writes the flat layout (config.json, model.safetensors and the tokenizer in one folder);
`write_umt5(root, pipeline=True)` writes a diffusers pipeline's layout instead: `root/text_encoder/` holds the
model and `root/tokenizer/` its tokenizer, as in the released Wan2.1 pipelines.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

LINES = ["a red circle moves left", "a green square moves right", "a blue triangle moves up",
         "a yellow circle moves down", "the quick brown fox jumps over the lazy dog",
         "zero one two three four five six seven eight nine", "videos of shapes and colours, slowly & quickly"]


def t5_tokenizer(lines: list[str] = LINES, vocab_size: int = 64):
    """A transformers T5Tokenizer (pad 0, eos 1, unk 2, as T5's) over a unigram model trained on `lines`."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_writer=proto, vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto.getvalue())
    return T5Tokenizer(vocab=[(p.piece, p.score) for p in model.pieces], extra_ids=0,
                       _spm_precompiled_charsmap=model.normalizer_spec.precompiled_charsmap)


def write_umt5(out: Path, d_model: int = 32, layers: int = 2, seed: int = 0, pipeline: bool = False) -> Path:
    """A tiny random UMT5 encoder + tokenizer under `out`; returns the folder to give as text.encoder (`out`, or
    `out/text_encoder` with pipeline=True, whose tokenizer then sits in the sibling `out/tokenizer`)."""
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out)
    encoder_dir, tokenizer_dir = (out / "text_encoder", out / "tokenizer") if pipeline else (out, out)
    tokenizer = t5_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                        dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    UMT5EncoderModel(config).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    return encoder_dir
