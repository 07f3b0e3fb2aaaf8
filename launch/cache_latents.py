"""Encode a video dataset once into VAE latent shards: `[torchrun ...] python launch/cache_latents.py DIT_PRESET.yaml
[key=value ...] --out DIR`.

Every rank encodes its share of the source shards (the first bucket of `data.buckets`, clips from the
start of each video at `data.fps`); rank 0 writes `index.json` with the cache key, so the DiT recipe
(`data.latents=DIR`) refuses a cache made with another VAE, resolution, frame count or fps. `vae.path` may be
our video_vae export or a diffusers AutoencoderKLWan folder (its latents are cached normalised, as WanPipeline
normalises them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import numpy as np
import torch
from tqdm import tqdm

from framework import distributed as dist
from framework.config import ConfigError
from framework.data.buckets import parse_buckets
from framework.data.latents import FORMAT, cache_key, write_latent_shard
from framework.data.shards import load_index
from framework.data.video_decode import CorruptVideoError, clip_times, decode_clip, resize_crop
from framework.recipe import load_run_config
from recipes.video_dit.vae_ref import own_normalisation


def read_item(root: Path, shard: dict, item: dict) -> tuple[bytes, list[str]]:
    with open(root / shard["path"], "rb") as f:
        f.seek(item["offset"])
        data = f.read(item["size"])
        captions = None
        if "json_offset" in item:
            f.seek(item["json_offset"])
            captions = json.loads(f.read(item["json_size"])).get("captions")
    return data, captions or [""]


@torch.no_grad()
def encode_batched(vae, videos: list[torch.Tensor], device: torch.device, batch: int = 16) -> list[np.ndarray]:
    """VAE means of clips (3, T, H, W), `batch` at a time; whole clips for short ones (faster than chunks)."""
    out = []
    for i in range(0, len(videos), batch):
        x = torch.stack(videos[i: i + batch]).to(device=device, dtype=next(vae.parameters()).dtype)
        mean, _ = vae.encode(x, chunked=x.shape[2] > 33)
        out += list(mean.float().cpu().numpy())
    return out


def encode_split(cfg, vae, split: str, out: Path, rank: int, world: int) -> tuple[int, list[float]]:
    """Encode this rank's shards of a split; returns (clips written, [sum, sum of squares, count])."""
    index = load_index(Path(cfg.data.dir) / split)
    root = Path(index["root"])
    bucket = parse_buckets(cfg.data.buckets)[0]
    device = next(vae.parameters()).device
    sums = [0.0, 0.0, 0.0]
    written = 0
    mine = list(range(rank, len(index["shards"]), world))
    for s in tqdm(mine, desc=f"{split} shards (rank {rank})", disable=rank != 0):
        shard = index["shards"][s]
        samples = []
        for item in shard["items"]:
            if item["duration"] < bucket.frames / cfg.data.fps:
                continue
            try:
                data, captions = read_item(root, shard, item)
                frames = decode_clip(data, clip_times(item["duration"], cfg.data.fps, bucket.frames, 0.0))
            except (CorruptVideoError, ValueError) as e:
                print(f"skipped {shard['path']}:{item['key']}: {e}", file=sys.stderr)
                continue
            samples.append((item["key"], resize_crop(frames, bucket.height, bucket.width), captions))
        latents = encode_batched(vae, [video for _, video, _ in samples], device)
        for z in latents:
            sums = [sums[0] + float(z.sum()), sums[1] + float((z.astype(np.float64) ** 2).sum()), sums[2] + z.size]
        samples = [(key, z, captions) for (key, _, captions), z in zip(samples, latents)]
        if samples:
            entry = write_latent_shard(out / split / shard["path"], samples)
            (out / split / f"{shard['path']}.json").write_text(json.dumps(entry))
            written += len(samples)
    return written, sums


def normalisation(vae, mean: float, std: float) -> dict:
    """The index's latent_mean / latent_std: what the DiT recipe normalises cached latents by, (z - mean) / std.
    The measured statistics for our VAE; (0, 1) for a VAE whose latents come out normalised already (Wan:
    by its latents_mean / latents_std, so cached and online training see the same latents), the measured
    ones then kept as measured_mean / measured_std."""
    own = own_normalisation(vae)
    if own is None:
        return {"latent_mean": mean, "latent_std": std}
    return {"latent_mean": own[0], "latent_std": 1.0 / own[1], "measured_mean": mean, "measured_std": std}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dist.prepare_env()
    try:
        cfg, recipe = load_run_config(args.preset, args.overrides, dist.env_world_size())
        if recipe.name != "video_dit":
            raise ConfigError(f"cache_latents needs a video_dit preset, got recipe {recipe.name}")
        dist.init()
        vae = recipe.build_helpers(cfg)["vae"].to(dist.device())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world, out = dist.rank(), dist.world(), Path(args.out)
    key = cache_key(cfg.vae.path, cfg.data.buckets[0], cfg.data.fps)
    for split in ("train", "val"):
        written, sums = encode_split(cfg, vae, split, out, rank, world)
        total = dist.all_reduce([float(written), *sums], op="sum")
        dist.barrier()
        if dist.is_main():
            entries = [json.loads(p.read_text()) for p in sorted((out / split).glob("*.tar.json"))]
            mean = total[1] / total[3]
            std = (total[2] / total[3] - mean**2) ** 0.5
            index = {"format": FORMAT, "cache_key": key, **normalisation(vae, mean, std), "shards": entries}
            (out / split / "index.json").write_text(json.dumps(index))
            for p in (out / split).glob("*.tar.json"):
                p.unlink()
            print(f"{split}: {int(total[0])} clips -> {out / split} (latent mean {mean:.4f}, std {std:.4f})")
        dist.barrier()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
