"""A transformers fast tokenizer that encodes exactly like our sentencepiece model (same ids).

Built from the sentencepiece model proto with the `tokenizers` library alone (no transformers-internal
converter): transformers' own conversion puts the dummy prefix "▁" in a Metaspace pre-tokenizer and splits
special tokens out before normalising, so text after a `<mask>` (and text that starts with a space or a
`<mask>`) gets another prefix than sentencepiece gives it. Here the normaliser adds the prefix once to the
whole text, user-defined pieces (`<mask>`) are isolated after it, and special tokens are not split out
ahead of the pipeline (`split_special_tokens=True`): the model still maps `<mask>` to its id, as
sentencepiece does. Checked against sentencepiece in tests/unit/test_hf_export.py (unigram and BPE).

Known difference: control tokens typed in the text (`<s>`, `</s>`, `<pad>`, `<unk>`) become their ids here;
sentencepiece spells them out piece by piece.
"""

from __future__ import annotations

import re
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram
from transformers import PreTrainedTokenizerFast

NORMAL, USER_DEFINED = 1, 4  # sentencepiece piece types
UNIGRAM, BPE_TYPE = 1, 2  # sentencepiece model types


def from_sentencepiece(model_file: str | Path, mask_token: str = "<mask>") -> PreTrainedTokenizerFast:
    """The fast tokenizer of a sentencepiece `.model` file, with bos/eos/unk/pad/mask tokens set."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces, trainer, spec = list(proto.pieces), proto.trainer_spec, proto.normalizer_spec
    user_defined = sorted((p.piece for p in pieces if p.type == USER_DEFINED), key=len, reverse=True)
    if trainer.model_type == UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == BPE_TYPE:
        model = BPE({p.piece: i for i, p in enumerate(pieces)}, _merges(pieces), unk_token=pieces[trainer.unk_id].piece,
                    fuse_unk=True, byte_fallback=trainer.byte_fallback, ignore_merges=bool(user_defined))
    else:
        raise ValueError(f"{model_file}: sentencepiece model type {trainer.model_type} is not unigram or BPE")
    backend = Tokenizer(model)

    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # only spaces, as sentencepiece does
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    isolate = [pre_tokenizers.Split(Regex("|".join(map(re.escape, user_defined))), behavior="isolated")]
    backend.pre_tokenizer = pre_tokenizers.Sequence(isolate if user_defined else [])
    decode = [decoders.Replace("▁", " ")] + ([decoders.ByteFallback()] if trainer.byte_fallback else [])
    decode += [decoders.Fuse()] + ([decoders.Strip(content=" ", left=1)] if spec.add_dummy_prefix else [])
    backend.decoder = decoders.Sequence(decode)

    special = {name: pieces[i].piece for name, i in (("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id),
                                                     ("unk_token", trainer.unk_id), ("pad_token", trainer.pad_id))
               if 0 <= i < len(pieces)}
    if mask_token in user_defined:
        special["mask_token"] = mask_token
    return PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True, **special)


def _merges(pieces: list) -> list[tuple[str, str]]:
    """BPE merges recovered from the pieces: every split of a normal piece into two normal pieces, ranked
    by the merged piece's score (higher first), then its id, which is how sentencepiece orders them."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == NORMAL}
    ranked = [(-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]
