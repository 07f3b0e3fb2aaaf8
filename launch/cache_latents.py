"""Encode a video dataset once into VAE latent shards: `[torchrun ...] python launch/cache_latents.py DIT_PRESET.yaml
[key=value ...] --out DIR`.

Every rank encodes its share of the source shards (the first bucket of `data.buckets`, clips from the
start of each video at `data.fps`); rank 0 writes `index.json` with the cache key, so the DiT recipe
(`data.latents=DIR`) refuses a cache made with another VAE, resolution, frame count or fps. `vae.path` may be
our video_vae export or a diffusers AutoencoderKLWan folder (its latents are cached normalised, as WanPipeline
normalises them).

With a frozen text encoder (`text.encoder=FOLDER`, T5/UMT5; a diffusers pipeline's `text_encoder/` finds its
sibling `tokenizer/`), every caption of every clip is also embedded once, as training would embed it (WanPipeline's
recipe, text.max_len, the compute dtype of train.precision), into `SPLIT/text/` beside the latents, with the
states of "" as the null caption; training then runs neither the VAE nor the text encoder per step.
`--text-only` adds or rebuilds those embeddings for an existing latent cache. Both stages are resumable: a split
whose index already has this run's key is left as it is, and the caption stage also keeps the shards a killed
run finished (`--force` redoes everything).
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
from framework.data.latents import (
    FORMAT,
    TEXT_FORMAT,
    cache_key,
    read_member,
    read_text_index,
    to_numpy,
    write_latent_shard,
    write_text_shard,
)
from framework.data.shards import load_index
from framework.data.video_decode import CorruptVideoError, clip_times, decode_clip, resize_crop
from framework.recipe import load_run_config
from recipes.video_dit.recipe import compute_dtype, text_cache_key
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


def latent_split(cfg, vae, split: str, out: Path, key: dict, rank: int, world: int, force: bool) -> None:
    """Encode one split into latent shards and write its index.json (rank 0), unless it is there with this key."""
    index_path = out / split / "index.json"
    if not force and index_path.is_file() and json.loads(index_path.read_text()).get("cache_key") == key:
        if dist.is_main():
            print(f"{split}: latents already cached in {out / split} with this key")
        return
    written, sums = encode_split(cfg, vae, split, out, rank, world)
    total = dist.all_reduce([float(written), *sums], op="sum")
    dist.barrier()
    if dist.is_main():
        entries = [json.loads(p.read_text()) for p in sorted((out / split).glob("*.tar.json"))]
        mean = total[1] / total[3]
        std = (total[2] / total[3] - mean**2) ** 0.5
        index = {"format": FORMAT, "cache_key": key, **normalisation(vae, mean, std), "shards": entries}
        index_path.write_text(json.dumps(index))
        for p in (out / split).glob("*.tar.json"):
            p.unlink()
        print(f"{split}: {int(total[0])} clips -> {out / split} (latent mean {mean:.4f}, std {std:.4f})")
    dist.barrier()


def shard_captions(path: Path, items: list[dict]) -> list[tuple[str, list[str]]]:
    """(key, captions) of every clip of a latent shard, from its KEY.json."""
    return [(item["key"], json.loads(read_member(path, item["json"]))["captions"]) for item in items]


@torch.no_grad()
def embed_captions(encoder, captions: list[str], batch: int = 16) -> list[torch.Tensor]:
    """Each caption's states trimmed to its tokens (L, D): the encoder gives exact zeros past them."""
    out = []
    for i in range(0, len(captions), batch):
        states, mask = encoder(captions[i: i + batch])
        out += [s[: int(m.sum())] for s, m in zip(states, mask)]
    return out


def text_split(encoder, split: str, out: Path, key: dict, rank: int, world: int, force: bool) -> None:
    """Embed every caption of one split's latent shards into SPLIT/text/ (this rank's shards; rank 0 writes the
    null caption and index.json). A shard whose entry file holds this key was finished by an earlier run."""
    text_dir = out / split / "text"
    existing = None if force else read_text_index(out / split)
    if existing is not None and existing["text_key"] == key:
        if dist.is_main():
            print(f"{split}: caption embeddings already cached in {text_dir} with this key")
        return
    index = load_index(out / split)
    root = Path(index["root"])
    mine = list(range(rank, len(index["shards"]), world))
    for s in tqdm(mine, desc=f"{split} captions (rank {rank})", disable=rank != 0):
        shard = index["shards"][s]
        entry_path = text_dir / f"{shard['path']}.json"
        if not force and entry_path.is_file() and json.loads(entry_path.read_text()).get("text_key") == key:
            continue
        clips = shard_captions(root / shard["path"], shard["items"])
        states = iter(embed_captions(encoder, [c for _, caps in clips for c in caps]))
        entry = write_text_shard(text_dir / shard["path"], [(k, [next(states) for _ in caps]) for k, caps in clips])
        tmp = entry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**entry, "text_key": key}))
        tmp.replace(entry_path)  # the entry appears only once its tar is complete: resume trusts it
    dist.barrier()
    if dist.is_main():
        null = embed_captions(encoder, [""])[0]
        np.save(text_dir / "null.npy", to_numpy(null), allow_pickle=False)
        entries = [json.loads((text_dir / f"{sh['path']}.json").read_text()) for sh in index["shards"]]
        shards = {e["path"]: {"path": e["path"], "items": e["items"]} for e in entries}
        text_index = {"format": TEXT_FORMAT, "text_key": key, "null": "null.npy", "shards": shards}
        (text_dir / "index.json").write_text(json.dumps(text_index))
        for sh in index["shards"]:
            (text_dir / f"{sh['path']}.json").unlink()
        n = sum(len(c) for e in entries for c in e["items"].values())
        print(f"{split}: {n} caption embeddings ({key['dtype']}, max_len {key['max_len']}) -> {text_dir}")
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", required=True)
    parser.add_argument("--text-only", action="store_true", help="only (re)build the caption embeddings")
    parser.add_argument("--force", action="store_true", help="rebuild what is already cached with this key")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dist.prepare_env()
    out = Path(args.out)
    try:
        cfg, recipe = load_run_config(args.preset, args.overrides, dist.env_world_size())
        if recipe.name != "video_dit":
            raise ConfigError(f"cache_latents needs a video_dit preset, got recipe {recipe.name}")
        if args.text_only and cfg.text.encoder == "bytes":
            raise ConfigError("--text-only: text.encoder=bytes is trained with the DiT, so there is nothing to cache")
        if args.text_only and not (out / "train" / "index.json").is_file():
            raise ConfigError(f"--text-only: no latent cache at {out / 'train'}; run without --text-only first")
        dist.init()
        helpers = recipe.build_helpers(cfg)
        text_key = text_cache_key(cfg) if "text_encoder" in helpers else None  # hashes the encoder's files
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    rank, world, device = dist.rank(), dist.world(), dist.device()
    if not args.text_only:
        vae = helpers["vae"].to(device)
        key = cache_key(cfg.vae.path, cfg.data.buckets[0], cfg.data.fps)
        for split in ("train", "val"):
            latent_split(cfg, vae, split, out, key, rank, world, args.force)
        del vae
    if "text_encoder" in helpers:
        # The dtype training computes in (the trainer casts helpers to it), so cached states equal online ones.
        encoder = helpers["text_encoder"].requires_grad_(False).eval().to(device=device, dtype=compute_dtype(cfg))
        for split in ("train", "val"):
            text_split(encoder, split, out, text_key, rank, world, args.force)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
