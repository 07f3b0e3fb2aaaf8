"""diffusers' AutoencoderKLWan (Wan2.1's VAE) as the frozen VAE: `load_vae` wraps diffusers' own module, encode and
decode equal diffusers' with WanPipeline's latents_mean / latents_std normalisation, long clips encode causally
chunk by chunk, the latent cache is keyed by the Wan VAE's identity, and a DiT trains and samples through it via
the CLI. Every VAE here is a tiny random one built and saved by diffusers."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.config import ConfigError
from framework.data.latents import cache_key
from recipes.video_dit.vae_ref import VaeRefConfig, WanVAE, latent_stats, load_vae, vae_config
from tests.runs import ROOT, env
from tests.vae_exports import write_video_vae

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

Z = 4  # latent channels of the tiny VAEs (latents_mean / latents_std have as many values)
TINY = dict(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
DIT = str(ROOT / "recipes/video_dit/configs/tiny.yaml")
SMALL_DIT = [f"model.in_channels={Z}", "model.dim=32", "model.depth=2", "model.heads=2", "model.ffn_hidden=64",
             "model.text_dim=32", "text.layers=1", "text.heads=2", "sample.steps=2", "log.every=1",
             "log.wandb=disabled", "log.progress=false", "eval.every=0", "eval.at_end=false", "checkpoint.every=0",
             "data.buckets=['32x32x9:2']", "data.num_workers=0", "train.micro_batch=2", "train.global_batch=2",
             "optim.warmup_steps=1", "train.steps=2"]


def wan_folder(path: Path, seed: int = 0, **extra) -> AutoencoderKLWan:
    """A tiny random AutoencoderKLWan with non-trivial per-channel statistics, saved by diffusers to `path`."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 100)
    stats = dict(latents_mean=(torch.rand(Z, generator=g) * 2 - 1).tolist(),
                 latents_std=(torch.rand(Z, generator=g) * 2 + 0.5).tolist())
    model = AutoencoderKLWan(**{**TINY, **stats, **extra}).eval()
    model.save_pretrained(path)
    return model


def pipeline_stats(model: AutoencoderKLWan) -> tuple[torch.Tensor, torch.Tensor]:
    """WanPipeline's (latents_mean, latents_std) tensors: latents_std there is 1 / config.latents_std."""
    shape = (1, model.config.z_dim, 1, 1, 1)
    return (torch.tensor(model.config.latents_mean).view(shape),
            1.0 / torch.tensor(model.config.latents_std).view(shape))


def video(frames: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("extra", [{}, {"is_residual": True, "patch_size": 2, "in_channels": 12, "out_channels": 12}],
                         ids=["wan2.1", "wan2.2-residual-patch2"])
def test_load_vae_wraps_diffusers_and_encodes_and_decodes_as_it_does(tmp_path, extra):
    model = wan_folder(tmp_path / "vae", **extra)
    vae = load_vae(str(tmp_path / "vae"))
    assert isinstance(vae, WanVAE) and isinstance(vae.module, AutoencoderKLWan)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.module.training
    space = 16 if extra else 8
    geometry = vae_config(str(tmp_path / "vae"))
    assert geometry.compression == vae.cfg.compression == (4, space, space)
    assert geometry.latent_shape(9, 32, 32) == (Z, 3, 32 // space, 32 // space)

    x = video(9)
    mean, logvar = vae.encode(x)
    latents_mean, latents_std = pipeline_stats(model)
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        expected = (posterior.mean - latents_mean) * latents_std
        assert mean.shape == vae.latent_shape(x.shape) == expected.shape
        assert torch.allclose(mean, expected, atol=1e-5, rtol=0)
        # the posterior's log-variance in the same normalised space: var / std^2
        assert torch.allclose(logvar, posterior.logvar + 2 * latents_std.log(), atol=1e-5, rtol=0)
        assert (mean - posterior.mean).abs().max() > 0.1  # the normalisation did something

        decoded = vae.decode(mean)
        theirs = model.decode(mean / latents_std + latents_mean).sample
    assert decoded.shape == x.shape
    assert torch.allclose(decoded, theirs, atol=1e-5, rtol=0)


def test_chunked_encoding_of_a_long_clip_equals_whole_clip_encoding(tmp_path):
    """diffusers encodes the first frame alone, then 4 frames at a time through its feature cache: driving its
    encoder chunk by chunk with that cache, and encoding every prefix of 1 + 4m frames, give the whole clip's
    latents (the causal property chunked encoding of long clips rests on)."""
    model = wan_folder(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    x = video(17, size=16, seed=1)
    whole, _ = vae.encode(x, chunked=False)
    assert torch.equal(whole, vae.encode(x, chunked=True)[0])
    for m in range(4):  # prefixes of 1, 5, 9, 13 frames
        prefix, _ = vae.encode(x[:, :, : 1 + 4 * m])
        assert torch.allclose(prefix, whole[:, :, : 1 + m], atol=1e-5, rtol=0)

    chunks = [x[:, :, :1]] + [x[:, :, i : i + 4] for i in range(1, 17, 4)]
    with torch.no_grad():
        model.clear_cache()
        outs = []
        for chunk in chunks:
            model._enc_conv_idx = [0]
            outs.append(model.encoder(chunk, feat_cache=model._enc_feat_map, feat_idx=model._enc_conv_idx))
        mu = model.quant_conv(torch.cat(outs, dim=2))[:, :Z]
    latents_mean, latents_std = pipeline_stats(model)
    assert torch.allclose(whole, (mu - latents_mean) * latents_std, atol=1e-5, rtol=0)


def test_wan_normalisation_is_its_own_and_other_values_are_config_errors(tmp_path):
    wan_folder(tmp_path / "vae")
    path = str(tmp_path / "vae")
    vae = load_vae(path)
    assert latent_stats(VaeRefConfig(path=path), vae, lambda: iter(())) == (0.0, 1.0)  # no clips read
    VaeRefConfig(path=path, scale=1.0, shift=0.0)  # identity on top of Wan's own: the same thing
    for scale, shift in [(0.5, 0.0), (1.0, 0.2), (0.0, 0.3)]:
        with pytest.raises(ConfigError, match=r"vae.scale.*latents_mean / latents_std"):
            VaeRefConfig(path=path, scale=scale, shift=shift)

    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "latents_std": [1.0] * (Z + 1)}))
    with pytest.raises(ConfigError, match=r"bad/config.json needs latents_mean and latents_std of z_dim=4"):
        vae_config(str(tmp_path / "bad"))
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))  # a good config, but no weights
    with pytest.raises(ConfigError, match=r"vae.path: .*bad: no diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path / "bad"))


def test_cache_key_is_the_wan_vaes_identity(tmp_path):
    wan_folder(tmp_path / "a", seed=0)
    wan_folder(tmp_path / "b", seed=1)  # other weights and statistics
    model = wan_folder(tmp_path / "c", seed=0)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["latents_mean"] = [v + 0.5 for v in config["latents_mean"]]  # the same weights, another latent space
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    keys = [cache_key(str(tmp_path / n), "32x32x9:2", 8.0)["vae_sha256"] for n in "abc"]
    assert len(set(keys)) == 3 and keys[0] == load_vae(str(tmp_path / "a")).identity
    model.save_pretrained(tmp_path / "a2")  # the same VAE saved again: the same identity
    assert cache_key(str(tmp_path / "a2"), "32x32x9:2", 8.0)["vae_sha256"] == keys[0]
    ours = tmp_path / "ours"  # our own exports keep their old key, so existing caches stay valid
    write_video_vae(ours, [False, True, True])
    old = hashlib.sha256((ours / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert cache_key(str(ours), "32x32x9:2", 8.0)["vae_sha256"] == old


def cli(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == code, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def cached_latent(cache: Path, key: str) -> np.ndarray:
    index = json.loads((cache / "train" / "index.json").read_text())
    for shard in index["shards"]:
        for item in shard["items"]:
            if item["key"] == key:
                with tarfile.open(cache / "train" / shard["path"]) as tar:
                    return np.load(io.BytesIO(tar.extractfile(f"{key}.latent.npy").read()))
    raise KeyError(key)


def test_latent_cache_records_the_wan_vae_and_refuses_another(shapes_data, tmp_path):
    """cache_latents.py with vae.path=a Wan folder: the key is that VAE's identity, the latents are the wrapper's
    normalised ones (index statistics 0 / 1 so training from the cache sees what online training sees), and a
    run with another Wan VAE refuses the cache."""
    from framework.data.shards import load_index
    from framework.data.video_decode import clip_times, decode_clip, resize_crop

    wan_folder(tmp_path / "vae")
    wan_folder(tmp_path / "other", seed=1)
    cache = tmp_path / "latents"
    common = [f"data.dir={shapes_data}", *SMALL_DIT]
    cli("launch/cache_latents.py", DIT, *common, f"vae.path={tmp_path / 'vae'}", "--out", str(cache))
    index = json.loads((cache / "train" / "index.json").read_text())
    vae = load_vae(str(tmp_path / "vae"))
    assert index["cache_key"]["vae_sha256"] == vae.identity
    assert (index["latent_mean"], index["latent_std"]) == (0.0, 1.0) and index["measured_std"] > 0

    source = load_index(shapes_data / "train")
    shard, item = source["shards"][0], source["shards"][0]["items"][0]
    with open(Path(source["root"]) / shard["path"], "rb") as f:
        f.seek(item["offset"])
        frames = decode_clip(f.read(item["size"]), clip_times(item["duration"], 8.0, 9, 0.0))
    clip = resize_crop(frames, 32, 32)[None]  # (1, 3, 9, 32, 32) in [-1, 1], as cache_latents.py encodes it
    expected = vae.encode(clip)[0][0].numpy()
    assert np.abs(cached_latent(cache, item["key"]) - expected).max() < 2e-3 * max(1.0, np.abs(expected).max())

    bad = cli("launch/train.py", DIT, *common, f"vae.path={tmp_path / 'other'}", f"data.latents={cache}",
              f"run_dir={tmp_path / 'bad'}", code=2)
    assert "rebuild the cache" in bad.stderr


def test_dit_trains_online_through_the_wan_vae_and_samples_through_it(shapes_data, tmp_path):
    """Two DiT steps with vae.path=a Wan folder and no cache, then evaluation samples decoded by diffusers'
    decoder into mp4s; a conflicting vae.scale is refused before any work."""
    import decord

    wan_folder(tmp_path / "vae")
    run_dir = tmp_path / "run"
    common = [f"data.dir={shapes_data}", *SMALL_DIT, f"vae.path={tmp_path / 'vae'}"]
    cli("launch/train.py", DIT, *common, f"run_dir={run_dir}", "eval.at_end=true", "eval.samples=2",
        "eval.batches=1")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2]
    videos = sorted((run_dir / "samples" / "step_00000002").glob("*.mp4"))
    assert len(videos) == 2 and len(decord.VideoReader(str(videos[0]))) == 9

    bad = cli("launch/train.py", DIT, *common, "vae.scale=0.5", f"run_dir={tmp_path / 'bad'}", code=2)
    assert "vae.scale=0.5" in bad.stderr and "latents_mean / latents_std" in bad.stderr


def test_a_bf16_run_keeps_the_wan_vae_in_fp32_and_encodes_as_diffusers_does(tmp_path):
    """The trainer casts frozen helpers to the compute dtype, except the Wan VAE (WanPipeline runs it in fp32): in
    a bf16 run its latents equal diffusers' fp32 ones, while an ordinary helper is cast."""
    from framework.trainer import freeze

    model = wan_folder(tmp_path / "vae")
    helpers = freeze({"vae": load_vae(str(tmp_path / "vae")), "other": torch.nn.Linear(2, 2)},
                     torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in helpers["vae"].parameters()} == {torch.float32}
    assert helpers["other"].weight.dtype == torch.bfloat16
    x = video(5)
    mean, _ = helpers["vae"].encode(x.to(torch.bfloat16))  # the loader's batch may arrive in the compute dtype
    latents_mean, latents_std = pipeline_stats(model)
    with torch.no_grad():
        expected = (model.encode(x.to(torch.bfloat16).float()).latent_dist.mean - latents_mean) * latents_std
    assert mean.dtype == torch.float32 and torch.allclose(mean, expected, atol=1e-5, rtol=0)
