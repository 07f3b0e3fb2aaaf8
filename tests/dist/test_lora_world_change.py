"""A LoRA run (LLaDA, ZeRO-2, 2 ranks over gloo) resumed on 1 rank: the checkpoint goes through DeepSpeed's universal
conversion like any world-size change, and the 1-rank engine holds exactly the 2-rank state (frozen base, adapters,
their fp32 master copies and AdamW moments), so one optimizer step on the same global batch gives what the 2-rank
engine gives (to float summation order: 2 ranks x 2 micro-batches vs 1 rank x 4). The CLI resume runs on too.

Run as a script under torchrun, this file is the worker: it loads a checkpoint as the trainer does and writes the
loaded and the stepped state to a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pytest
import torch

pytestmark = pytest.mark.dist

LORA = ["train.zero_stage=2", "lora.rank=4", "lora.alpha=8", "ema.decay=0", "optim.lr=1e-2", "train.steps=3",
        "checkpoint.every=2", "checkpoint.keep_last=5"]


def state_of(engine) -> dict[str, torch.Tensor]:
    """Every weight of the module, plus each trainable one's fp32 master copy and AdamW moments (gathered)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    # A loaded ZeRO-1/2 optimizer links each parameter to its moments only at its next step: link them now.
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[f"{name}/fp32"] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).clone()
    return out


def worker(ckpt: str, out_path: str) -> None:
    """Load `ckpt` as framework/trainer.py does at this world size, then one AdamW step on a fixed global batch."""
    import torch.nn.functional as F

    from framework import checkpoint, lora
    from framework import distributed as dist
    from framework import engine as engine_lib
    from framework.recipe import load_run_config

    dist.init()
    rank, world = dist.rank(), dist.world()
    ckpt = Path(ckpt)
    cfg, recipe = load_run_config(checkpoint.read_meta(ckpt)["config"], [], world=world)
    universal = checkpoint.needs_universal(ckpt, world)
    ds_config = engine_lib.deepspeed_config(cfg, world, load_universal=universal)
    with engine_lib.model_init_context(ds_config):
        model = recipe.build_model(cfg).model
    lora.apply(model, cfg)
    engine = engine_lib.initialize(model, cfg, ds_config)
    if universal:
        checkpoint.make_universal(ckpt)
    checkpoint.load_engine(engine, ckpt, universal)
    loaded = state_of(engine)

    micro, accum = cfg.train.micro_batch, cfg.grad_accum(world)
    ids = torch.randint(5, 400, (cfg.train.global_batch, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    mine = ids[rank * micro * accum:(rank + 1) * micro * accum]
    engine_lib.set_lr(engine, cfg.optim.lr)
    for m in range(accum):
        x = mine[m * micro:(m + 1) * micro]
        loss = F.cross_entropy(engine(x).flatten(0, 1).float(), x.flatten())
        engine.backward(loss)
        engine.step()
    stepped = state_of(engine)
    if dist.is_main():
        torch.save({"universal": universal, "loaded": loaded, "stepped": stepped}, out_path)


def run_worker(ckpt: Path, out: Path, nproc: int) -> dict:
    from framework.distributed import free_port
    from tests.runs import ROOT, env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(Path(__file__).resolve()), str(ckpt), str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
    return torch.load(out, weights_only=True)


def test_lora_two_ranks_resumed_on_one_continues_exactly(text_data, tmp_path):
    from framework.checkpoint import complete_checkpoints
    from framework.export.safetensors_io import consolidated_state_dict
    from framework.lora import split_state
    from tests.runs import losses, train

    # LoRA on a base that is not the model's seeded init (the usual case: train.init_from a trained model)
    pretrained = tmp_path / "pretrained"
    train(text_data, pretrained, "train.steps=1", "optim.lr=3e-2", "ema.decay=0")
    pretrained_weights = consolidated_state_dict(complete_checkpoints(pretrained / "checkpoints")[-1])
    run = tmp_path / "run"
    lora_run = [*LORA, f"train.init_from={pretrained}"]
    train(text_data, run, *lora_run, "train.stop_after=2", nproc=2)
    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    trained = consolidated_state_dict(ckpt)

    # The CLI: resume=auto on 1 rank converts and continues to the end; the frozen base is the pretrained one (a
    # universal checkpoint holds no frozen weights: they used to come back as the fresh model's init).
    out = train(text_data, run, *lora_run, "resume=auto", nproc=1)
    assert "world size changed 2 -> 1" in out.stdout + out.stderr
    assert sorted(losses(run)) == [1, 2, 3] and all(v == v for v in losses(run).values())
    end = consolidated_state_dict(complete_checkpoints(run / "checkpoints")[-1])
    base, adapters = split_state(end)
    trained_base, trained_adapters = split_state(trained)
    assert trained_base.keys() == pretrained_weights.keys()
    assert all(torch.equal(base[k], pretrained_weights[k]) for k in pretrained_weights)
    assert any(not torch.equal(b, trained_adapters[k][1]) for k, (_, b) in adapters.items())  # step 3 trained

    # The same checkpoint in a 2-rank engine (as saved) and a 1-rank one (universal): equal state, equal step.
    two = run_worker(ckpt, tmp_path / "two.pt", nproc=2)
    one = run_worker(ckpt, tmp_path / "one.pt", nproc=1)
    assert (two["universal"], one["universal"]) == (False, True)
    assert two["loaded"].keys() == one["loaded"].keys()
    assert any(k.endswith("/exp_avg_sq") for k in one["loaded"])
    for k, v in two["loaded"].items():
        assert torch.equal(v, one["loaded"][k]), k
    for k, v in trained.items():  # what was loaded is the checkpoint's weights
        assert torch.equal(one["loaded"][k], v), k
    moved = 0
    for k, v in two["stepped"].items():
        torch.testing.assert_close(one["stepped"][k], v, rtol=1e-5, atol=1e-7, msg=k)
        moved += ".lora_" in k and not torch.equal(v, two["loaded"][k])
    assert moved > 0


if __name__ == "__main__":
    worker(*sys.argv[1:3])
