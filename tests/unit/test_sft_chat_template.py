"""data/sft_to_shards.py with a transformers tokenizer folder: the chat template lays out every sample
token for token as tokenizer.apply_chat_template does (prompt up to the assistant header, answer with the
end-of-turn token), SFTStream pads with the folder's EOS, and a folder without a template is plain text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sft_to_shards import write_sft_shards
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from framework.data.sft import SFTStream
from framework.data.shards import load_index

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 512  # every sample below fits: no sample may be skipped as too long

# Llama-3 shape: BOS, role headers, <|eot_id|> ends a turn; a system turn after the first raises, as real
# templates do for malformed chats. EOS is <|end_of_text|>, distinct from the end-of-turn token (LLaDA's
# <eot_id> then <EOS> padding).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
          "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Qwen2 / ChatML shape: a default system turn, <|im_start|>role, <|im_end|> and a newline end a turn; EOS is
# the end-of-turn token itself, as in Qwen2-Instruct.
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SHAPES = {
    "llama3": dict(template=LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "chatml": dict(template=CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>", mask_token="<|mask|>",
                   additional_special_tokens=["<|im_start|>"]),
}
CORPUS = ["Where is the river? The river rose in the morning.", "And the station? By the market, near the school.",
          "Be brief. You are a helpful assistant.", "The farmers spoke to the council after the storm.",
          "What is 12 + 30? It is 42."]

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the river?"},
        {"role": "assistant", "content": "In the village, by the market."},
        {"role": "user", "content": "And the station?"},
        {"role": "assistant", "content": "Near the school."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "The farmers spoke after the storm."}]
PAIR = {"prompt": "What is 12 + 30?", "response": "It is 42."}


def make_tokenizer_folder(folder: Path, template: str | None, **special: object):
    """A tiny byte-level BPE trained here, wrapped as a transformers tokenizer and saved to folder."""
    from transformers import PreTrainedTokenizerFast

    extra = special.pop("additional_special_tokens", [])
    specials = list(special.values()) + extra
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, additional_special_tokens=extra, chat_template=template,
                                  **special)
    tok.save_pretrained(folder)
    return tok


def chat_ids(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def stream_rows(out: Path, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(prompt, prompt + answer) of every row of one epoch, the answer without the EOS the stream adds;
    checks that the row ends in EOS padding."""
    stream = SFTStream(out, SEQ_LEN, 1, 0, 1, seed=0)
    assert stream.eos_id == eos_id
    rows = []
    for _, batch in zip(range(len(stream)), stream):
        ids, p, a = batch["input_ids"][0].tolist(), int(batch["prompt_len"][0]), int(batch["answer_len"][0])
        assert ids[p + a - 1:] == [eos_id] * (SEQ_LEN - p - a + 1)  # the answer's EOS, then EOS padding
        rows.append((ids[:p], ids[:p + a - 1]))
    return sorted(rows)


@pytest.mark.parametrize("shape", SHAPES)
def test_chat_template_samples_match_apply_chat_template(tmp_path, shape):
    spec = dict(SHAPES[shape])
    tok = make_tokenizer_folder(tmp_path / "tok", spec.pop("template"), **spec)
    lines = [json.dumps({"messages": CHAT}), json.dumps(PAIR), json.dumps({"messages": [{"role": "user"}]})]
    if shape == "llama3":  # the template itself rejects this chat: reported as FILE:LINE, not a traceback
        lines.append(json.dumps({"messages": [CHAT[1], CHAT[2], CHAT[0], CHAT[3], CHAT[4]]}))
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "data/sft_to_shards.py", "--input", str(tmp_path / "chat.jsonl"),
                          "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "chat.jsonl:3:" in run.stderr and "Traceback" not in run.stderr
    if shape == "llama3":
        assert "chat.jsonl:4: chat template failed: system must come first" in run.stderr

    # One sample per assistant turn; earlier assistant turns sit in the prompt as the template renders them.
    chats = [CHAT, [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR["response"]}]]
    expected = sorted((chat_ids(tok, chat[:i], True), chat_ids(tok, chat[:i + 1], False))
                      for chat in chats for i, m in enumerate(chat) if m["role"] == "assistant")
    assert len(expected) == 4
    assert stream_rows(tmp_path / "out", tok.eos_token_id) == expected
    # The answer carries the template's end-of-turn token(s); EOS follows it.
    end_of_turn = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n"}[shape]
    for prompt, full in expected:
        assert tok.decode(full[len(prompt):]).endswith(end_of_turn)

    index = load_index(tmp_path / "out")
    assert (index["samples"], index["records"], index["bad_records"]) == (4, len(lines), len(lines) - 2)
    assert index["tokenizer_kind"] == "transformers" and index["template"].startswith("tokenizer chat template")
    assert (index["eos_id"], index["pad_id"], index["bos_id"], index["mask_id"], index["vocab_size"]) == (
        tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.mask_token_id, len(tok))
    assert (index["mask_id"] is None) == (shape == "llama3") and "eos_id" in index["pad_policy"]


def test_folder_without_chat_template_is_plain_text_with_its_eos(tmp_path):
    spec = dict(SHAPES["chatml"])
    spec.pop("template")
    tok = make_tokenizer_folder(tmp_path / "tok", None, **spec)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT[:5]}) + "\n")
    index = write_sft_shards([tmp_path / "chat.jsonl"], tmp_path / "tok", tmp_path / "out", progress=False)
    enc, eos = (lambda text: tok.encode(text, add_special_tokens=False)), tok.eos_token_id
    first = enc("Be brief.\nWhere is the river?")
    second = first + enc(CHAT[2]["content"]) + [eos] + enc("And the station?")
    assert stream_rows(tmp_path / "out", eos) == sorted([(first, first + enc(CHAT[2]["content"])),
                                                          (second, second + enc(CHAT[4]["content"]))])
    assert index["tokenizer_kind"] == "transformers" and index["template"].startswith("system/user turns")


def test_bad_tokenizer_folder_is_one_line_error(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "chat.jsonl").write_text(json.dumps(PAIR) + "\n")
    with pytest.raises(ValueError, match=f"tokenizer folder {tmp_path / 'tok'} is not a loadable") as e:
        write_sft_shards([tmp_path / "chat.jsonl"], tmp_path / "tok", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_template_whose_answer_does_not_extend_the_prompt_is_a_bad_record(tmp_path):
    # The generation prompt says "bot" but a rendered assistant turn says "assistant": no clean split.
    spec = dict(SHAPES["chatml"])
    spec["template"] = spec["template"].replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    make_tokenizer_folder(tmp_path / "tok", spec.pop("template"), **spec)
    (tmp_path / "chat.jsonl").write_text(json.dumps(PAIR) + "\n")
    problems = []
    with pytest.raises(ValueError, match="no valid samples.*1 bad record"):
        write_sft_shards([tmp_path / "chat.jsonl"], tmp_path / "tok", tmp_path / "out", report=problems.append,
                         progress=False)
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'chat.jsonl'}:1: the chat template's")
