"""Logits of a checkpoint computed by a real (sharded) DeepSpeed engine: `torchrun ... CKPT IDS.pt OUT.pt`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from framework import checkpoint, distributed as dist, engine as engine_lib  # noqa: E402
from framework.recipe import load_run_config  # noqa: E402


def main(ckpt: str, ids_path: str, out_path: str) -> None:
    dist.init()
    meta = checkpoint.read_meta(Path(ckpt))
    cfg, recipe = load_run_config(meta["config"], [], world=dist.world())
    ds_config = engine_lib.deepspeed_config(cfg, dist.world())
    with engine_lib.model_init_context(ds_config):
        model = recipe.build_model(cfg).model
    engine = engine_lib.initialize(model, cfg, ds_config)
    checkpoint.load_engine(engine, Path(ckpt), universal=False)
    engine.eval()
    with torch.no_grad():
        logits = engine(torch.load(ids_path))
    if dist.is_main():
        torch.save(logits, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
