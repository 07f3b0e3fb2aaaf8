"""Config errors name the key before any work starts; overrides and presets resolve to typed values."""

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from framework.config import ConfigError, parse_override
from framework.recipe import load_run_config
from framework.schedule import lr_at

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes/llada/configs/tiny.yaml")


def test_preset_and_overrides_are_typed():
    cfg, recipe = load_run_config(TINY, ["train.steps=7", "optim.lr=1e-3", "model.qk_norm=true"], world=1)
    assert recipe.name == "llada"
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.model.qk_norm is True
    assert cfg.run_dir == "runs/llada_tiny"


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'; did you mean 'train.steps'"):
        load_run_config(TINY, ["train.stpes=3"], world=1)
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        load_run_config(TINY, ["modle.dim=3"], world=1)


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        load_run_config(TINY, ["train.steps=ten"], world=1)
    with pytest.raises(ConfigError, match=r"train.precision: 'fp8' is not one of"):
        load_run_config(TINY, ["train.precision=fp8"], world=1)


def test_global_batch_must_divide_by_micro_times_world():
    with pytest.raises(ConfigError, match=r"train.global_batch=32 is not divisible by .*world size \(3\)"):
        load_run_config(TINY, [], world=3)
    cfg, _ = load_run_config(TINY, [], world=2)
    assert cfg.grad_accum(2) == 1


def test_seq_len_above_model_maximum():
    with pytest.raises(ConfigError, match=r"data.seq_len=512 exceeds model.max_seq_len=128"):
        load_run_config(TINY, ["data.seq_len=512"], world=1)


def test_unknown_recipe_and_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope' \(known: [a-z_, ]*llada"):
        load_run_config(TINY, ["recipe=nope"], world=1)
    with pytest.raises(ConfigError, match=r"preset file not found"):
        load_run_config(str(tmp_path / "missing.yaml"), [], world=1)
    with pytest.raises(ConfigError, match=r"not of the form key.sub=value"):
        parse_override("train.steps")


def test_cli_exits_nonzero_naming_the_key(tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", TINY, "train.micro_bach=2", f"run_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "train.micro_bach" in out.stderr and "train.micro_batch" in out.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_cli_missing_dataset_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "launch/train.py", TINY, f"data.dir={tmp_path / 'nodata'}",
                          f"run_dir={tmp_path / 'run'}", "log.wandb=disabled"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "data.dir: no tokenizer" in out.stderr and "prepare_text.py" in out.stderr


def test_lr_schedule_warmup_then_cosine():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="constant", **kw) == 1.0


def test_video_buckets_are_checked_before_any_work():
    dit = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
    with pytest.raises(ConfigError, match=r"data.buckets: '64x64x16:8' has 16 frames; the causal VAE needs 1 \+ 4k"):
        load_run_config(dit, ["data.buckets=['64x64x16:8']"], world=1)
    with pytest.raises(ConfigError, match=r"data.buckets: '60x64x17:8' is 60x64; the VAE needs multiples of 8"):
        load_run_config(str(ROOT / "recipes/video_vae/configs/tiny.yaml"), ["data.buckets=['60x64x17:8']"], world=1)
    with pytest.raises(ConfigError, match=r"train.micro_batch=16 but the largest bucket batch in data.buckets is 8"):
        load_run_config(dit, ["train.micro_batch=16", "train.global_batch=16"], world=1)
    for preset in ("dit_xl2", "wan2_1_1_3b", "wan2_1_14b", "wan2_1_t2v_1_3b", "wan2_1_t2v_14b"):
        cfg, recipe = load_run_config(str(ROOT / f"recipes/video_dit/configs/{preset}.yaml"), [], world=8)
        assert "DiT parameters" in recipe.describe(cfg)


@pytest.mark.parametrize("preset, released", [("wan2_1_t2v_1_3b", 1_418_996_800), ("wan2_1_t2v_14b", 14_288_491_584)])
def test_released_wan_presets_describe_without_allocating(preset, released):
    """--describe of the released Wan shapes: diffusers' parameter count, counted on the meta device (the 14B
    model in fp32 would need 57 GB)."""
    from framework import lora

    cfg, recipe = load_run_config(str(ROOT / f"recipes/video_dit/configs/{preset}.yaml"), [], world=8)
    assert (cfg.model.arch, cfg.model.in_channels, cfg.model.text_dim) == ("wan", 16, 4096)
    assert f"({released:,}, model.arch=wan)" in recipe.describe(cfg)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    line = lora.describe(cfg, recipe, world=8)
    # exactly diffusers' count: with a frozen UMT5 the null caption is the encoder's states of "", not a parameter
    assert f"trainable {released:,} / frozen 0" in line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # less than 1 GiB more


def test_wan_arch_refuses_dit_settings():
    dit = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
    with pytest.raises(ConfigError, match=r"model.arch=wan: model.depth=2 is a model.arch=dit setting \(arch=wan: "
                                          r"model.wan.num_layers\)"):
        load_run_config(dit, ["model.arch=wan", "model.depth=2"], world=1)
    with pytest.raises(ConfigError, match=r"model.text_dim=64 differs from model.wan.text_dim=4096"):
        load_run_config(dit, ["model.arch=wan", "model.text_dim=64"], world=1)
    with pytest.raises(ConfigError, match=r"model.wan.out_channels=8 but the recipe predicts latents of "
                                          r"model.wan.in_channels=16"):
        load_run_config(dit, ["model.arch=wan", "model.wan.out_channels=8"], world=1)
    with pytest.raises(ConfigError, match=r"data.buckets: '64x64x17:8' gives a latent grid \[5, 4, 4\], beyond "
                                          r"model.wan.rope_max_seq_len=4 positions per axis"):
        load_run_config(dit, ["model.arch=wan", "model.wan.rope_max_seq_len=4"], world=1)
    cfg, _ = load_run_config(dit, ["model.arch=wan", "model.wan.text_dim=64", "model.wan.patch_size=[1, 1, 1]"], world=1)
    assert (cfg.model.text_dim, cfg.model.patch) == (64, [1, 1, 1])  # the shared fields follow model.wan
