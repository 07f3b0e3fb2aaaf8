"""Tiny released-style autoregressive checkpoints built here by transformers: a Llama or Qwen2 folder as
`save_pretrained` writes it, with a byte-level BPE tokenizer trained on a few sentences (tests/unit/test_ar_import.py,
tests/recipes/test_ar_adapt_cli.py)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = ["Where is the river? The river rose in the morning.", "And the station? By the market, near the school.",
          "add 4 + 5 = 9. sort 3 1 2 : 1 2 3. reverse a b c : c b a. copy 7 2 : 7 2.",
          "The farmers spoke to the council after the storm.", "What is 12 + 30? It is 42."]
# Qwen2-Instruct's ChatML shape: a default system turn, <|im_start|>role ... <|im_end|>
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer(folder: Path, family: str, mask: bool = False):
    """A tiny byte-level BPE saved as a transformers tokenizer: Llama-like (<s>, </s>) or Qwen2-like (ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        special, extra = dict(bos_token="<s>", eos_token="</s>"), []
    else:
        special, extra = dict(eos_token="<|endoftext|>"), ["<|im_start|>", "<|im_end|>"]
    if mask:
        special["mask_token"] = "<|mask|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=[*special.values(), *extra],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, additional_special_tokens=extra,
                                  chat_template=CHATML if family == "qwen2" else None, **special)
    tok.save_pretrained(folder)
    return tok


def ar_folder(folder: Path, family: str, extra_rows: int = 0, mask: bool = False, shard: str | None = None,
              **config):
    """A random transformers model of `family` (embedding rows = len(tokenizer) + extra_rows: Llama with
    grouped-query attention and an untied head, Qwen2 with its q/k/v biases and tied embeddings) saved with its
    tokenizer; norm gains and biases moved away from 1 and 0, so a dropped one shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer(folder, family, mask)
    shape = dict(vocab_size=len(tok) + extra_rows, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                 rope_theta=100000.0 if family == "llama" else 1000000.0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False, **config))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True, **config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.eval().save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return model, tok
