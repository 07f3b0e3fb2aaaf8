"""Caption embeddings of a frozen UMT5 cached beside the latents (launch/cache_latents.py's caption stage), read
back by training without the encoder, and the prompt-embedding recipe against diffusers' WanPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import ConfigError
from framework.data.latents import FORMAT, cache_key, write_latent_shard
from framework.distributed import free_port
from framework.recipe import load_run_config
from tests.runs import ROOT, env
from tests.text_encoders import write_umt5
from tests.vae_exports import write_video_vae

PRESET = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
BUCKET = "32x32x9:2"
SMALL = ["model.in_channels=4", "model.dim=32", "model.depth=1", "model.heads=2", "model.ffn_hidden=64",
         "model.text_dim=32", "text.max_len=12", f"data.buckets=['{BUCKET}']", "train.micro_batch=2",
         "train.global_batch=2", "sample.steps=2", "diffusion.caption_dropout=0.5"]
# Several captions per clip (1 to 3), with HTML entities and odd spacing that WanPipeline's cleaning rewrites.
CAPTIONS = [["a red circle moves left", "red  circle &amp; left"], ["a blue triangle moves up"],
            ["a green square moves right", "green square", "the quick brown fox"], ["yellow circle moves down"]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """A tiny random VAE export and a tiny random UMT5 in a diffusers pipeline's layout (tokenizer/ beside it)."""
    base = tmp_path_factory.mktemp("text_cache")
    write_video_vae(base / "vae", [True, True, False], latent_channels=4)  # 32x32x9 -> latents (4, 3, 4, 4)
    return {"base": base, "vae": base / "vae", "umt5": write_umt5(base / "pipe", pipeline=True),
            "other_umt5": write_umt5(base / "other", seed=1)}


def latent_cache(out: Path, vae: Path, splits=("train", "val")) -> Path:
    """A latent cache as cache_latents.py's latent stage writes it (random latents, 2 shards of 4 clips)."""
    rng = np.random.default_rng(0)
    for split in splits:
        entries = []
        for s in range(2):
            samples = [(f"clip{s}{i}", rng.standard_normal((4, 3, 4, 4)).astype(np.float32), CAPTIONS[i])
                       for i in range(4)]
            entries.append(write_latent_shard(out / split / f"shard{s}.tar", samples))
        index = {"format": FORMAT, "cache_key": cache_key(str(vae), BUCKET, 8.0), "latent_mean": 0.0,
                 "latent_std": 1.0, "shards": entries}
        (out / split / "index.json").write_text(json.dumps(index))
    return out


def config(assets: dict, cache: Path, *overrides: str, encoder: Path | None = None):
    cfg, recipe = load_run_config(PRESET, [*SMALL, f"vae.path={assets['vae']}", f"data.latents={cache}",
                                           f"text.encoder={encoder or assets['umt5']}", *overrides], world=1)
    return cfg, recipe


def build_text_cache(cfg, recipe, cache: Path) -> None:
    """cache_latents.py's caption stage, in process (one rank), with the encoder in the run's compute dtype."""
    sys.path.insert(0, str(ROOT / "launch"))
    from cache_latents import text_split

    from recipes.video_dit.recipe import compute_dtype, text_cache_key

    encoder = recipe.build_helpers(cfg)["text_encoder"].to(dtype=compute_dtype(cfg))
    for split in ("train", "val"):
        text_split(encoder, split, cache, text_cache_key(cfg), 0, 1, force=False)


class Counting:
    """Counts calls of a real callable and calls it (nothing replaced, nothing returned for it)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_prompt_embeddings_equal_wanpipeline_and_null_is_negative_prompt(assets):
    """text.encoder=PIPE/text_encoder finds PIPE/tokenizer; states equal WanPipeline.encode_prompt's exactly (clean,
    pad to max length, zero the padding, truncate), and the null caption is its negative-prompt embedding of ""."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from recipes.video_dit.text_encoder import FrozenTextEncoder

    root = assets["umt5"].parent
    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), vae=None, transformer=None,
                       text_encoder=UMT5EncoderModel.from_pretrained(root / "text_encoder"),
                       scheduler=FlowMatchEulerDiscreteScheduler())
    prompts = ["&amp;amp;  red\n circle ", "the quick brown fox jumps over the lazy dog " * 3, ""]
    with torch.no_grad():
        theirs, negative = pipe.encode_prompt(prompts, max_sequence_length=12, device="cpu")
    ours = FrozenTextEncoder(str(assets["umt5"]), max_len=12)
    states, mask = ours(prompts)
    assert torch.equal(states, theirs) and states.shape == (3, 12, 32)
    assert mask.sum(1).tolist() == [int((s.abs().sum(-1) > 0).sum()) for s in theirs] and mask[1].all()
    null, null_mask = ours.null()
    assert torch.equal(null, negative[:1]) and null_mask.tolist() == [[True] + [False] * 11]


def test_cache_is_keyed_complete_and_read_back_without_the_encoder(assets, tmp_path, monkeypatch):
    """Training from the cache reads the states the encoder gives (several captions per clip, the seeded choice,
    exact on resume) and constructs neither the encoder nor runs the VAE; sampling builds the encoder lazily."""
    from transformers import UMT5EncoderModel

    cache = latent_cache(tmp_path / "cache", assets["vae"])
    cfg, recipe = config(assets, cache, "train.precision=fp32")
    build_text_cache(cfg, recipe, cache)
    text_index = json.loads((cache / "train" / "text" / "index.json").read_text())
    assert text_index["text_key"]["max_len"] == 12 and text_index["text_key"]["dtype"] == "float32"
    assert sum(len(c) for s in text_index["shards"].values() for c in s["items"].values()) == 2 * 7

    reference = recipe.build_helpers(cfg)["text_encoder"]  # an online encoder to compare with, loaded now
    reference.load()
    constructed = Counting(UMT5EncoderModel.__init__)
    monkeypatch.setattr(UMT5EncoderModel, "__init__", lambda self, *a, **k: constructed(self, *a, **k))
    stream = recipe.build_data(cfg, "train", 0, 1)
    helpers = recipe.build_helpers(cfg)
    encode = Counting(helpers["vae"].encode)
    helpers["vae"].encode = encode
    torch.manual_seed(0)
    model = recipe.build_model(cfg).model
    chosen = set()
    for step in range(len(stream) * 3):  # three epochs: each picks another caption of the clips that have several
        batch = next(stream)
        states, mask = reference(batch["caption"])
        assert torch.equal(batch["text"], states) and torch.equal(batch["text_mask"], mask)
        chosen.update(batch["caption"])
        loss, _ = recipe.loss(cfg, model, helpers, batch, torch.Generator().manual_seed(step))
        loss.backward()
    assert chosen == {c for caps in CAPTIONS for c in caps}
    null, null_mask = reference.null()
    assert torch.equal(batch["null_text"], null) and torch.equal(batch["null_mask"], null_mask)
    assert constructed.calls == 0 and helpers["text_encoder"].encoder is None and encode.calls == 0

    state = stream.state_dict()  # resume mid-epoch: the same captions and states follow
    expected = [next(stream) for _ in range(3)]
    again = recipe.build_data(cfg, "train", 0, 1)
    again.load_state_dict(state)
    for want in expected:
        got = next(again)
        assert got["caption"] == want["caption"] and torch.equal(got["text"], want["text"])

    with torch.no_grad():  # a prompt the cache never saw: the encoder is built now, once
        recipe.sample_latents(cfg, model, helpers, ["a purple star", "a red circle moves left"], seed=0)
    assert constructed.calls == 1 and helpers["text_encoder"].encoder is not None


def test_frozen_null_caption_replaces_dropped_rows(assets, tmp_path):
    """With a frozen encoder, caption dropout gives the states of "" (the cached ones), not the learned token,
    which the model then does not have."""
    cache = latent_cache(tmp_path / "cache", assets["vae"])
    cfg, recipe = config(assets, cache, "train.precision=fp32")
    build_text_cache(cfg, recipe, cache)
    helpers = recipe.build_helpers(cfg)
    model = recipe.build_model(cfg).model
    assert model.null_text is None and not any("null" in k for k in model.state_dict())
    batch = next(recipe.build_data(cfg, "train", 0, 1))
    keep = torch.tensor([False, True])
    text, mask, drop = recipe.frozen_dropout(model, helpers, batch, batch["text"], batch["text_mask"], keep)
    assert drop is None and torch.equal(text[0], batch["null_text"][0]) and torch.equal(text[1], batch["text"][1])
    assert mask[0].tolist() == [True] + [False] * 11

    online = {k: batch[k] for k in ("latents", "caption")}  # the same batch without the cache: the encoder runs
    text, mask = recipe.caption_states(model, helpers, online)
    assert torch.equal(text, batch["text"]) and torch.equal(mask, batch["text_mask"])
    text, mask, _ = recipe.frozen_dropout(model, helpers, online, text, mask, keep)
    assert torch.equal(text[0], batch["null_text"][0]) and torch.equal(mask[0], batch["null_mask"][0])


def test_mismatched_or_incomplete_text_cache_is_a_config_error(assets, tmp_path):
    cache = latent_cache(tmp_path / "cache", assets["vae"])
    cfg, recipe = config(assets, cache, "train.precision=bf16")
    build_text_cache(cfg, recipe, cache)
    stored = np.load(next((cache / "train" / "text").glob("null.npy")))
    assert stored.dtype == np.int16  # bf16 kept bit for bit (numpy has no bf16)
    batch = next(recipe.build_data(cfg, "train", 0, 1))
    assert batch["text"].dtype == torch.bfloat16
    for overrides, encoder, key in [(["text.max_len=16"], None, "'max_len': 12"),
                                    (["train.precision=fp32"], None, "'dtype': 'bfloat16'"),
                                    ([], assets["other_umt5"], "encoder_sha256")]:
        other, _ = config(assets, cache, *overrides, encoder=encoder)
        with pytest.raises(ConfigError, match="text.encoder, text.max_len, train.precision") as e:
            recipe.build_data(other, "train", 0, 1)
        assert key in str(e.value) and "--text-only" in str(e.value)

    index_path = cache / "train" / "text" / "index.json"  # a clip without embeddings: named, with the command
    index = json.loads(index_path.read_text())
    del index["shards"]["shard1.tar"]["items"]["clip12"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"no caption embeddings for shard1.tar:clip12 .*--text-only"):
        recipe.build_data(cfg, "train", 0, 1)


def test_caption_stage_resumes_and_is_idempotent(assets, tmp_path, capsys):
    """A killed caption stage leaves finished shards' entries: the rerun keeps those shards and embeds the rest,
    ending with the same index; a finished split is left alone."""
    cache = latent_cache(tmp_path / "cache", assets["vae"])
    cfg, recipe = config(assets, cache, "train.precision=fp32")
    build_text_cache(cfg, recipe, cache)
    text_dir = cache / "train" / "text"
    first = json.loads((text_dir / "index.json").read_text())
    assert "caption embeddings already cached" not in capsys.readouterr().out
    build_text_cache(cfg, recipe, cache)
    assert capsys.readouterr().out.count("caption embeddings already cached") == 2

    # What a run killed after shard0 leaves: shard0's tar and entry, no index; shard1's tar half written.
    (text_dir / "shard0.tar.json").write_text(json.dumps({**first["shards"]["shard0.tar"], "text_key": first["text_key"]}))
    (text_dir / "index.json").unlink()
    (text_dir / "shard1.tar").write_bytes(b"partial")
    kept = (text_dir / "shard0.tar").stat().st_mtime_ns
    build_text_cache(cfg, recipe, cache)
    assert (text_dir / "shard0.tar").stat().st_mtime_ns == kept
    assert json.loads((text_dir / "index.json").read_text()) == first and not list(text_dir.glob("*.tar.json"))


@pytest.mark.slow
def test_cache_latents_cli_embeds_captions_and_training_uses_them(shapes_data, assets, tmp_path):
    """launch/cache_latents.py on 2 ranks writes latents and caption embeddings (2 captions per shapes clip);
    training reads them; another text.max_len is refused with the command that rebuilds them."""
    cache = tmp_path / "cache"
    common = [f"data.dir={shapes_data}", f"vae.path={assets['vae']}", f"text.encoder={assets['umt5']}", *SMALL,
              "data.num_workers=1", "log.wandb=disabled", "log.progress=false", "eval.every=0",
              "eval.at_end=false", "checkpoint.every=0", "train.global_batch=4"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "launch/cache_latents.py", PRESET, *common, "--out", str(cache)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((cache / "train" / "text" / "index.json").read_text())
    assert sum(len(s["items"]) for s in index["shards"].values()) == 48
    assert sum(len(c) for s in index["shards"].values() for c in s["items"].values()) == 96

    train = [sys.executable, "launch/train.py", PRESET, *common, f"data.latents={cache}", "train.steps=2"]
    ran = subprocess.run([*train, f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "done: step 2" in ran.stdout and "no caption embeddings" not in ran.stdout
    assert "text encoder: loading" not in ran.stdout  # the UMT5 was never built
    bad = subprocess.run([*train, "text.max_len=16", f"run_dir={tmp_path / 'bad'}"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "text.max_len=16" in bad.stderr and "--text-only" in bad.stderr
