"""Run under torchrun (2 ranks, gloo): train.sequence_parallel=2 against SP=1 on the same sample.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/sp_worker.py STAGE OUT.json FAMILY...

For each model family: build it (seeded) inside a real DeepSpeed engine (ZeRO-STAGE, DeepSpeed's own
sequence-parallel mpu), copy its weights into a plain module, then on one sample compute
- the SP=2 loss and DeepSpeed's reduced gradients (`safe_get_full_grad`) after `engine.backward`,
- the SP=1 loss and gradients of the plain module (`sequence_parallel.unsharded`, plain autograd),
- the eval-mode outputs of both under no_grad (what sampling and evaluation run).
Rank 0 writes the numbers to OUT.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from framework import distributed as dist
from framework import engine as engine_lib
from framework.config import RunConfig
from framework.nn import sequence_parallel


def video_dit(checkpointing: str = "none") -> tuple[torch.nn.Module, callable]:
    from recipes.video_dit.model import VideoDiT, VideoDiTConfig

    model = VideoDiT(VideoDiTConfig(in_channels=4, dim=32, depth=2, heads=2, ffn_hidden=64, text_dim=16,
                                    activation_checkpointing=checkpointing))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
    mask = torch.tensor([[True, True, True, False, False]])
    target = torch.randn(1, 4, 3, 4, 4, generator=g)
    t = torch.tensor([0.3])
    return model, lambda m: ((m(x, t, text, mask) - target) ** 2).mean()


def wan() -> tuple[torch.nn.Module, callable]:
    from recipes.video_dit.wan import WanConfig, WanDiT

    model = WanDiT(WanConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                             text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2))
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.02)  # Wan's zero head would leave the blocks no gradient
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
    target = torch.randn(1, 4, 3, 4, 4, generator=g)
    t = torch.tensor([0.6])
    return model, lambda m: ((m(x, t, text) - target) ** 2).mean()


def joint_av() -> tuple[torch.nn.Module, callable]:
    from recipes.video_audio.model import JointAVConfig, JointAVDiT

    model = JointAVDiT(JointAVConfig(video_channels=4, audio_channels=4, dim=32, depth=2, heads=2, ffn_hidden=64,
                                     text_dim=16))
    g = torch.Generator().manual_seed(4)
    video, audio, text = (torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 4, 8, generator=g),
                          torch.randn(1, 5, 16, generator=g))
    targets = torch.randn(1, 4, 3, 4, 4, generator=g), torch.randn(1, 4, 8, generator=g)
    t_video, t_audio, mask = torch.tensor([0.3]), torch.tensor([0.7]), torch.tensor([[True] * 4 + [False]])

    def loss(m):
        v, a = m(video, audio, t_video, t_audio, text, mask, bridge=torch.tensor([True]), video_t0=0.5)
        return ((v - targets[0]) ** 2).mean() + ((a - targets[1]) ** 2).mean()

    return model, loss


def llada() -> tuple[torch.nn.Module, callable]:
    from framework.nn.llada import LladaModel, LladaModelConfig

    model = LladaModel(LladaModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                        max_seq_len=16))
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])  # packed rows: attention stays within a document

    def loss(m):
        logits = m(ids, doc_ids=doc_ids)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    return model, loss


def llada_ar() -> tuple[torch.nn.Module, callable]:
    """The autoregressive twin (causal) on left-padded rows: a key padding mask over the whole sequence."""
    from framework.nn.llada import LladaModel, LladaModelConfig

    model = LladaModel(LladaModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16,
                                        causal=True, qk_norm=True))
    g = torch.Generator().manual_seed(6)
    ids, targets = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    real = torch.tensor([[False] * 3 + [True] * 5, [True] * 8])
    positions = (real.long().cumsum(1) - 1).clamp(min=0)

    def loss(m):
        logits = m(ids, key_padding_mask=real, positions=positions)
        return torch.nn.functional.cross_entropy(logits[real].float(), targets[real])

    return model, loss


FAMILIES = {"video_dit": video_dit, "video_dit_recompute": lambda: video_dit("full"), "llada": llada, "llada_ar": llada_ar, "wan": wan, "joint_av": joint_av}


def unzero(model: torch.nn.Module) -> None:
    """Fill zero-initialised projections (adaLN-Zero, zero heads) with small noise, so every parameter gets a
    gradient through every path (a zero gate would hide a wrong gradient behind a zero one)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def check(family: str, stage: int) -> dict:
    import deepspeed

    cfg = RunConfig()
    cfg.train.global_batch, cfg.train.micro_batch, cfg.train.zero_stage = 1, 1, stage
    cfg.train.sequence_parallel = 2
    mpu = sequence_parallel.init(2)
    ds_config = engine_lib.deepspeed_config(cfg, sequence_parallel.dp_world(dist.world(), 2))
    torch.manual_seed(0)
    with engine_lib.model_init_context(ds_config, mpu):
        model, loss_fn = FAMILIES[family]()
    engine = engine_lib.initialize(model, cfg, ds_config, mpu=mpu)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if dist.rank() == 0 or stage < 3:  # ZeRO-3 broadcasts rank 0's write; otherwise each rank writes alike
            unzero(engine.module)
    with deepspeed.zero.GatheredParameters(params):
        reference = copy.deepcopy(engine.module) if stage < 3 else None
        full = [p.detach().clone() for p in params]
    if reference is None:  # a ZeRO-3 module deep-copies its partitioned parameters: rebuild from the same seed
        torch.manual_seed(0)
        reference = FAMILIES[family]()[0]
    with torch.no_grad():
        for q, p in zip(reference.parameters(), full):
            q.copy_(p)

    engine.train()
    loss = loss_fn(engine)
    engine.backward(loss)
    grads = [deepspeed.utils.safe_get_full_grad(p) for p in params]
    with sequence_parallel.unsharded():
        ref_loss = loss_fn(reference)
        ref_loss.backward()
        engine.eval()
        reference.eval()
    with torch.no_grad():
        eval_sp = loss_fn(engine)
        with sequence_parallel.unsharded():
            eval_ref = loss_fn(reference)
    names = [n for n, _ in engine.module.named_parameters()]
    diffs = {n: [float((g - q.grad).abs().max()), float(q.grad.abs().max())]
             for n, g, q in zip(names, grads, reference.parameters())}
    zero_grads = [n for n, q in zip(names, reference.parameters()) if not q.grad.abs().sum()]
    return {"loss": float(loss.detach()), "ref_loss": float(ref_loss.detach()), "eval": float(eval_sp), "ref_eval": float(eval_ref),
            "grad_diff_and_scale": diffs, "zero_ref_grads": zero_grads,
            "ref_grad_norm": float(torch.cat([q.grad.flatten() for q in reference.parameters()]).norm())}


def main() -> None:
    stage, out, families = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    dist.init()
    results = {f: check(f, stage) for f in families}
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown()
    # Every result is written: leave without interpreter finalisation. Under CI load a rank of this all-to-all
    # heavy worker aborted after the teardown ("terminate called without an active exception", SIGABRT): Gloo
    # work objects still referenced from Python were freed during finalisation (pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
