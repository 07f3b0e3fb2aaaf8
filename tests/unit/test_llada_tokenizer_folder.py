"""A LLaDA run on shards tokenised by a transformers tokenizer folder (data/sft_to_shards.py --tokenizer FOLDER):
the tokenizer is the init_from LLaDA folder's (or data.tokenizer's), its ids are the run's (EOS, padding, the
mask token <|mdm_mask|>), prompts, samples and exact match go through it, and a model whose mask id is not the
tokenizer's is a config error."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sft_to_shards import write_sft_shards
from test_llada_layout import llama, write_folder
from test_sft_chat_template import make_tokenizer_folder

from framework.config import ConfigError
from tests.runs import ROOT, env

TASKS_TINY = str(ROOT / "recipes/llada/configs/tasks_tiny.yaml")
PAIRS = [("add 4 + 5 =", "9"), ("sort 3 1 2 :", "1 2 3"), ("reverse a b c :", "c b a"), ("copy 7 2 :", "7 2"),
         ("add 12 + 30 =", "42"), ("sort 9 8 :", "8 9"), ("reverse the river :", "river the"), ("copy 5 :", "5")]


def tokenizer_folder(folder: Path):
    """A LLaDA-like tokenizer: EOS <|endoftext|>, the mask <|mdm_mask|> as an added special token (not mask_token)."""
    return make_tokenizer_folder(folder, None, eos_token="<|endoftext|>",
                                 additional_special_tokens=["<|mdm_mask|>"])


def shards(tok_folder: Path, data: Path) -> None:
    """train/ and val/ SFT shards by data/sft_to_shards.py's writer (in process: the CLI would import
    transformers twice more)."""
    for split, records in (("train", PAIRS * 4), ("val", PAIRS)):
        jsonl = data / f"{split}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
        index = write_sft_shards([jsonl], tok_folder, data / split, samples_per_shard=8)
        assert index["tokenizer_kind"] == "transformers" and index["samples"] == len(records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LLaDA folder whose tokenizer is the tiny one, SFT data tokenised with it, the tokenizer)."""
    root = tmp_path_factory.mktemp("llada_tok")
    source = root / "LLaDA-tiny"
    tok = tokenizer_folder(source)
    mask = tok.convert_tokens_to_ids("<|mdm_mask|>")
    vocab = len(tok) + 16  # the release pads its embedding past the tokenizer too
    write_folder(llama(vocab=vocab, dim=48, heads=4, kv_heads=2, hidden=80), source, vocab=len(tok), mask_id=mask)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # write_folder's placeholders: the real ones back
        (source / name).unlink()
    tok.save_pretrained(source)
    shards(source, root / "data")
    return source, root / "data", tok


def test_tokenizer_ids_come_from_the_folder(setup):
    from framework.recipe import load_run_config
    from recipes.llada.recipe import LladaRecipe

    source, data, tok = setup
    cfg, recipe = load_run_config(TASKS_TINY, [f"train.init_from={source}", f"data.dir={data}"], world=1)
    found = LladaRecipe().check_tokenizer(cfg)
    assert (found.kind, found.eos_id, found.mask_id) == ("transformers", tok.eos_token_id, cfg.model.mask_id)
    assert found.mask_id == tok.convert_tokens_to_ids("<|mdm_mask|>")
    ids = found.encode_prompt("sort 3 1 2 :")
    assert ids == tok.encode("sort 3 1 2 :", add_special_tokens=False)
    assert found.decode(ids + [cfg.model.vocab_size - 1]) == "sort 3 1 2 :"  # an id past the tokenizer: dropped


@pytest.mark.parametrize("template", [None, "llama3"])
def test_sample_prompts_are_laid_out_as_the_sft_data(tmp_path, template):
    """A prompt to sample is encoded as data/sft_to_shards.py encoded the prompts trained on: the chat
    template's rendering with the generation prompt, or plain text."""
    from sft_to_shards import load_tokenizer
    from test_sft_chat_template import SHAPES

    from recipes.llada.tokenizer import transformers_tokenizer

    shape = dict(SHAPES["llama3"]) if template else {"eos_token": "<|endoftext|>"}
    text = shape.pop("template", None)
    shape["additional_special_tokens"] = [*shape.get("additional_special_tokens", []), "<|mdm_mask|>"]
    make_tokenizer_folder(tmp_path, text, **shape)
    ours = transformers_tokenizer(str(tmp_path))
    for prompt, response in PAIRS[:3]:
        trained = load_tokenizer(tmp_path).samples([("user", prompt), ("assistant", response)])[0][0]
        assert ours.encode_prompt(prompt) == trained
        assert prompt in ours.decode(trained)


def test_mask_id_disagreeing_with_the_tokenizer_is_a_config_error(setup, tmp_path):
    from framework.recipe import load_run_config
    from recipes.llada.recipe import LladaRecipe

    source, data, tok = setup
    other = tmp_path / "LLaDA-other-mask"
    write_folder(llama(vocab=len(tok) + 8, dim=32, heads=4, kv_heads=2, hidden=48), other, mask_id=len(tok) + 1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    tok.save_pretrained(other)
    cfg, _ = load_run_config(TASKS_TINY, [f"train.init_from={other}", f"data.dir={data}"], world=1)
    with pytest.raises(ConfigError, match=f"model.mask_id={len(tok) + 1} but the tokenizer's mask token id is "
                                          f"{tok.convert_tokens_to_ids('<|mdm_mask|>')}"):
        LladaRecipe().check_tokenizer(cfg)
    # data.tokenizer names the folder for a model of our own: the preset's mask id 4 is not <|mdm_mask|>
    cfg, _ = load_run_config(TASKS_TINY, [f"data.tokenizer={source}", f"data.dir={data}", "model.vocab_size=512"],
                             world=1)
    with pytest.raises(ConfigError, match="model.mask_id=4 but the tokenizer's mask token id"):
        LladaRecipe().check_tokenizer(cfg)
    # shards written by another tokenizer (their index records another EOS) are refused too
    shutil.copytree(data, tmp_path / "data")
    index = json.loads((tmp_path / "data/train/index.json").read_text())
    (tmp_path / "data/train/index.json").write_text(json.dumps({**index, "eos_id": index["eos_id"] + 5}))
    cfg, _ = load_run_config(TASKS_TINY, [f"train.init_from={source}", f"data.dir={tmp_path / 'data'}"], world=1)
    with pytest.raises(ConfigError, match=f"was tokenised with eos_id={index['eos_id'] + 5} .* has {tok.eos_token_id}"):
        LladaRecipe().check_tokenizer(cfg)
    cfg, _ = load_run_config(TASKS_TINY, [f"data.tokenizer={tmp_path / 'missing'}", f"data.dir={data}"], world=1)
    with pytest.raises(ConfigError, match="data.tokenizer: .*missing is not a folder"):
        LladaRecipe().check_tokenizer(cfg)


def expected_samples(source: Path, tok, prompts: list[str], batch: int) -> list[str]:
    """What the run must print at lr 0: the released weights decoded here (full confidence, the run's sample
    settings), the prompts encoded and the answers decoded with the folder's tokenizer."""
    from framework.data.sft import left_pad_prompts
    from framework.diffusion.masked_decode import DecodeConfig, decode
    from framework.export import llada_io
    from framework.nn.llada import LladaModel

    state, cfg = llada_io.read(source)
    model = LladaModel(cfg).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    settings = DecodeConfig(gen_length=8, block_length=8, steps=8, confidence="full")
    lines = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        ids, mask = left_pad_prompts([tok.encode(p, add_special_tokens=False) for p in chunk], tok.eos_token_id)
        out = decode(model, ids, mask, settings, mask_id=cfg.mask_id, eos_id=tok.eos_token_id).tokens.tolist()
        for prompt, row in zip(chunk, out):
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            text = tok.decode([i for i in row if i < len(tok)], skip_special_tokens=True)
            lines.append(f"{prompt} ->{text}")
    return lines


def test_train_evaluate_and_sample_with_the_folders_tokenizer(setup, tmp_path):
    source, data, tok = setup
    run_dir = tmp_path / "run"
    args = [TASKS_TINY, f"train.init_from={source}", f"data.dir={data}", f"run_dir={run_dir}", "train.steps=2",
            "train.global_batch=4", "train.micro_batch=2", "train.zero_stage=0", "optim.lr=0", "checkpoint.every=0",
            "eval.every=0", "eval.at_end=true", "eval.batches=1", "eval.micro_batch=4", "eval.samples=4",
            "log.every=1", "log.wandb=disabled", "log.progress=false", "data.seq_len=32", "sample.gen_length=8",
            "sample.block_length=8", "sample.steps=8", "sample.cache=none", "sample.threshold=0",
            "sample.batch_size=2"]
    run = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/exact_match" in r]
    assert evals and 0.0 <= evals[-1]["eval/exact_match"] <= 1.0 and "eval/elbo_bits_per_token" in evals[-1]
    assert "confidence: full" in (run_dir / "config.yaml").read_text()  # imported LLaDA: the official convention
    prompts = ["add 482 + 97 =", "sort 5 1 9 3 :", "reverse a b c d :", "copy 7 2 9 :"]  # the preset's
    lines = (run_dir / "samples/step_00000002/samples.txt").read_text().splitlines()
    expected = expected_samples(source, tok, prompts, batch=2)
    assert lines == expected
    assert any(line.split("->", 1)[1].strip() for line in lines)  # some text came out to compare
