"""The memory planner (framework/memory_plan.py, launch/plan.py): model states against DeepSpeed's own estimators,
activations measured on meta against a real CPU forward, checkpointing, every preset, the CLI."""

from __future__ import annotations

import dataclasses
import functools
import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))

import plan as plan_cli  # noqa: E402  launch/plan.py

from framework import memory_plan as mp  # noqa: E402
from framework.recipe import load_run_config  # noqa: E402
from tests.recipes.test_video_recipes import vae_export  # noqa: E402, F401  (a fixture: the teacher's VAE)

TINY = {"llada": "recipes/llada/configs/tiny.yaml", "video_dit": "recipes/video_dit/configs/tiny.yaml",
        "video_audio": "recipes/video_audio/configs/tiny.yaml", "llada_bd": "recipes/llada/configs/tasks_tiny_bd.yaml"}
DISTILL = str(ROOT / "recipes/video_distill/configs/tiny.yaml")


def cpu_allocator(run) -> tuple[int, int]:
    """(bytes still allocated when run() returns, peak) by the CPU allocator's own events (torch.profiler's memory
    records): an account independent of the planner's hooks. The garbage collector is held off so that nothing
    allocated before is freed inside."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
    finally:
        gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del result
    return live, peak


@pytest.mark.parametrize("params", [1_000_003, 1_418_996_800, 8_015_581_184])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_model_states_match_deepspeed_estimators(params, gpus, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    largest = params // 17
    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=offload)
    ours = mp.model_state_bytes(params, largest, stage=2, dp=gpus, precision="bf16", offload=offload)
    assert abs(ours.gpu - ds_gpu) <= 4
    if offload and gpus <= 4:  # DeepSpeed: the node's host memory x 1.5 buffer; above 4 GPUs its term for each
        # process loading the whole fp32 model at start (4 x gpus bytes a parameter) wins, a transient we leave out
        assert ours.cpu * gpus * 1.5 == pytest.approx(ds_cpu, rel=1e-6)
    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus,
                                                               cpu_offload=offload, cpu_offload_params=False)
    ours = mp.model_state_bytes(params, largest, stage=3, dp=gpus, precision="bf16", offload=offload)
    assert abs(ours.gpu - ds_gpu) <= 4
    if offload:
        assert ours.cpu * gpus * 1.5 == pytest.approx(ds_cpu, rel=1e-6)


def test_zero_stages_shard_more_and_fp32_costs_more():
    p, layer = 10**9, 10**7
    gpu = [mp.model_state_bytes(p, layer, s, 8).gpu for s in (0, 1, 2, 3)]
    assert gpu[0] > gpu[1] > gpu[2] > gpu[3]
    assert mp.model_state_bytes(p, layer, 2, 8, "fp32").weights == 2 * mp.model_state_bytes(p, layer, 2, 8).weights


def _profile(name: str, device: str) -> mp.SavedProfile:
    cfg, recipe = load_run_config(TINY[name], [], 1)
    cfg = plan_cli.without_checkpointing(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = recipe.build_model(cfg).model
    model.train()
    step = plan_cli.training_step(recipe, cfg, 0, 2, device=device)
    return mp.measure_saved(model, step, mp.find_blocks(model))


@pytest.mark.parametrize("name", sorted(TINY))
def test_meta_forward_saves_what_a_real_cpu_forward_saves(name):
    meta, real = _profile(name, "meta"), _profile(name, "cpu")
    assert meta.total > 0 and len(meta.blocks) == 4
    # The same bytes; which of them are attention masks only meta tells (there the planner calls the kernel).
    assert dataclasses.replace(meta, masks=real.masks) == real


def test_sdpa_on_meta_saves_like_flash_not_like_the_math_path():
    # The math path would save the (L x L) attention weights: 4 heads x 512^2 floats.
    q = torch.empty(1, 4, 512, 32, device="meta", requires_grad=True)
    prof = mp.measure_saved(torch.nn.Linear(1, 1), lambda m: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert prof.total == (512 * 4 * 32 + 512 * 4 * 32 + 4 * 512) * 4  # q (= k = v), out, log-sum-exp


def test_checkpointing_full_keeps_less_than_none_and_sp_divides():
    prof = _profile("llada", "meta")
    none = mp.activation_bytes(prof, mp.checkpointed_blocks("none", 4))
    full = mp.activation_bytes(prof, mp.checkpointed_blocks("full", 4))
    every2 = mp.activation_bytes(prof, mp.checkpointed_blocks("every_k", 4, 2))
    assert full < every2 < none
    # Full checkpointing still keeps every block's input, the fp32 residual stream (2 x 128 x 192 here), and
    # recomputes one block at a time.
    assert full - prof.outside >= 4 * (2 * 128 * 192 * 4) + max(prof.blocks)
    assert none == prof.total
    assert mp.activation_bytes(prof, set(), sp=2) == -(-none // 2)


def test_fit_search_finds_a_setting_that_fits():
    prof = _profile("llada", "meta")
    setting = mp.Setting(gpus=2, zero_stage=0, offload=False, checkpointing="none", micro_batch=2)
    p = 3 * 10**9
    est = mp.estimate(setting, p, 10**7, 4, lambda mb: prof)
    capacity = est.total - 1
    assert not est.fits(capacity)
    name, fit = mp.cheapest_fit(setting, p, 10**7, 4, lambda mb: prof, capacity)
    assert fit.fits(capacity) and name == "activation checkpointing full"
    name, fit = mp.cheapest_fit(setting, p, 10**7, 4, lambda mb: prof, 40 * mp.GIB)
    assert fit.fits(40 * mp.GIB) and "ZeRO" in name


def test_lora_costs_frozen_weights_but_no_optimizer_for_them():
    cfg, recipe = load_run_config(TINY["llada"], [], 1)
    plain = plan_cli.profile_model(recipe, cfg)
    cfg, recipe = load_run_config(TINY["llada"], ["lora.rank=4", "lora.targets=[wq,wv]"], 1)
    adapted = plan_cli.profile_model(recipe, cfg)
    assert adapted.frozen == plain.params and 0 < adapted.params < plain.params // 10
    states = mp.model_state_bytes(adapted.params, adapted.largest_layer, 2, 1, "fp32", frozen=adapted.frozen)
    assert states.weights == 4 * (adapted.params + adapted.frozen) and states.optimizer == 12 * adapted.params
    # Frozen Linear layers save no input for a weight gradient: fewer activation bytes than full training.
    assert adapted.measure_bucket(0, 2).total < plain.measure_bucket(0, 2).total


def _planned(preset: str, b: int, overrides=()) -> mp.SavedProfile:
    cfg, recipe = load_run_config(str(ROOT / preset), list(overrides), 1)
    return plan_cli.profile_model(recipe, cfg).measure_bucket(0, b)


def test_block_diffusion_plans_its_2L_forward_and_mask_as_the_cpu_allocator_counts_them():
    """objective.name=block_diffusion runs one forward over [noised ; clean] (2 x seq_len tokens) under an explicit
    per-row block-causal mask: about twice its masked twin's activations (same transformer, seq_len 64, micro-batch),
    each block keeping its own additive mask, and what a real CPU forward leaves allocated."""
    b, two_l = 4, 2 * 64
    masked, bd = _planned("recipes/llada/configs/tasks_tiny.yaml", b), _planned(TINY["llada_bd"], b)
    assert 1.9 < bd.total / masked.total < 2.4
    mask = b * two_l * two_l * 4  # each block saves the per-row mask made additive: fp32 (B, 1, 2L, 2L)
    assert bd.masks == [mask] * 4 and masked.masks == [0] * 4
    assert min(bd.blocks) >= 2 * max(masked.blocks) + mask
    # Sequence parallelism splits the tokens' bytes, not the mask: each rank attends the whole sequence under it.
    assert mp.activation_bytes(bd, set(), sp=2) == -(-(bd.total - 4 * mask) // 2) + 4 * mask
    full = mp.checkpointed_blocks("full", 4)
    assert mp.activation_bytes(bd, full, sp=2) - mp.activation_bytes(dataclasses.replace(bd, masks=[]), full, sp=2) \
        == mask - mask // 2  # checkpointed: only the block being recomputed holds a (whole, not halved) mask
    cfg, recipe = load_run_config(str(ROOT / TINY["llada_bd"]), [], 1)
    cfg = plan_cli.without_checkpointing(cfg)
    torch.manual_seed(0)
    model = recipe.build_model(cfg).model.train()
    step = plan_cli.training_step(recipe, cfg, 0, b, device="cpu")
    kept, _ = cpu_allocator(lambda: step(model))
    assert abs(mp.activation_bytes(bd, set()) / kept - 1) < 0.02, (bd.total, kept)


def test_live_peak_counts_what_a_no_grad_forward_holds_at_once():
    x = torch.empty(1000, 1000, device="meta")
    lin = torch.nn.Linear(1000, 1000, device="meta")

    def run():
        y = x * 2  # 4 MB
        z = lin(y).t()  # 4 MB more; the transpose is a view, the weight's view allocates nothing
        del y
        return (z + 1).sum()  # z and z + 1 alive together: 8 MB, then a scalar
    assert mp.measure_peak(run) == 8_000_000 + 4


# ---- video_distill: the student is its teacher's architecture, and the frozen teacher is a helper -------------------
@pytest.fixture(scope="module")
def teacher_run(shapes_data, vae_export, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny video_dit teacher run trained 1 step on one rank through launch/train.py."""
    from tests.recipes.test_video_recipes import DIT, SMALL_DIT, run

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    run(DIT, shapes_data, run_dir, *SMALL_DIT, f"vae.path={vae_export}", "train.steps=1", "checkpoint.every=1",
        nproc=1)
    return run_dir


def test_distill_plans_its_student_and_frozen_teacher_from_the_teacher_run(teacher_run):
    from recipes.video_distill.recipe import teacher_weights

    over = [f"distill.teacher={teacher_run}", "train.precision=bf16"]
    lines = plan_cli.plan(DISTILL, over, gpus=2, gpu_memory=80.0)
    assert f"the teacher run {teacher_run}" in "\n".join(lines)
    cfg, recipe = load_run_config(DISTILL, over, 1)
    prof = plan_cli.profile_model(recipe, cfg)
    # Student and teacher: exactly the teacher run's architecture (its trained weights' count), not the preset's.
    n_teacher = sum(w.numel() for w in teacher_weights(str(teacher_run)).values())
    assert prof.params == prof.teacher_params == n_teacher and prof.frozen == 0
    assert any(f"distill.teacher {n_teacher:,} parameters" in line for line in lines)
    # The teacher costs its bf16 weights whole (a helper) and no gradients or optimizer; states are the student's.
    est = mp.estimate(mp.Setting(gpus=2, zero_stage=2, offload=False, checkpointing="none", micro_batch=8),
                      prof.params, prof.largest_layer, prof.n_blocks, functools.partial(prof.measure_bucket, 0),
                      helpers=2 * n_teacher, transient=functools.partial(prof.teacher_peak, 0))
    assert est.states == mp.model_state_bytes(n_teacher, prof.largest_layer, 2, 2)
    assert est.total == est.states.gpu + 2 * n_teacher + max(est.activations, est.transient) + est.overhead
    # The no-grad guided teacher forward (2B rows) on meta = the CPU allocator's peak for the real teacher's.
    cfg = plan_cli.without_checkpointing(cfg)
    teacher = recipe.build_model(cfg).model
    teacher.load_state_dict(teacher_weights(str(teacher_run)))
    teacher = teacher.requires_grad_(False).eval().to(torch.bfloat16)
    step = plan_cli.teacher_step(recipe, cfg, 0, 2, device="cpu")
    with torch.no_grad():
        _, peak = cpu_allocator(lambda: step(teacher))
    assert prof.teacher_peak(0, 2) == peak


def test_distill_plans_from_the_teachers_preset_before_the_teacher_is_trained(monkeypatch):
    monkeypatch.chdir(ROOT)  # run dirs are relative to the repository, as for launch/train.py
    teacher = "runs/wan2_1_t2v_1_3b"  # recipes/video_dit/configs/wan2_1_t2v_1_3b.yaml trains it (run_dir by name)
    if Path(teacher).exists():
        pytest.skip(f"{teacher} exists here")
    lines = plan_cli.plan(DISTILL, [f"distill.teacher={teacher}"], gpus=8, gpu_memory=80.0)
    assert "recipes/video_dit/configs/wan2_1_t2v_1_3b.yaml" in lines[1] and "1,418,996,800 trainable" in lines[0]
    assert any("distill.teacher 1,418,996,800 parameters" in line for line in lines)


def test_distill_without_teacher_run_or_preset_names_the_missing_path(tmp_path):
    from framework.config import ConfigError

    with pytest.raises(ConfigError, match=f"distill.teacher: {tmp_path / 'nope'} does not exist"):
        plan_cli.plan(DISTILL, [f"distill.teacher={tmp_path / 'nope'}"], gpus=8, gpu_memory=80.0)


PRESETS = sorted(glob.glob(str(ROOT / "recipes/*/configs/*.yaml")))


@pytest.mark.parametrize("preset", PRESETS, ids=[Path(p).parent.parent.name + "/" + Path(p).stem for p in PRESETS])
def test_plan_runs_for_every_preset(preset, monkeypatch):
    # video_distill's teacher (runs/dit_tiny): its run where trained here, else its preset (video_dit/tiny.yaml).
    monkeypatch.chdir(ROOT)
    lines = plan_cli.plan(preset, [], gpus=8, gpu_memory=80.0)
    verdicts = [line for line in lines if line.endswith(("fits", "does not fit"))]
    assert verdicts, lines
    assert any(line.startswith(("largest bucket that fits", "no bucket fits")) for line in lines)


def test_plan_reads_the_presets_checkpointing_wherever_the_model_keeps_it():
    for preset in PRESETS:  # model.activation_checkpointing, or model.wan.activation_checkpointing for Wan
        cfg, _ = load_run_config(preset, [], 1)
        expected = "full" if "activation_checkpointing: full" in Path(preset).read_text() else "none"
        assert plan_cli.checkpointing_mode(cfg) == expected, preset


def test_plan_cli_exit_0_and_prints_fits():
    out = subprocess.run([sys.executable, "launch/plan.py", TINY["llada"], "--gpus", "2", "--gpu-memory", "24"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert " fits" in out.stdout and "largest bucket that fits: 128 tokens x 16" in out.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seq_len,batch", [(512, 4), (2048, 2)])
def test_gpu_activation_estimate_against_cuda_allocator(seq_len, batch):
    """The meta estimate against what a bf16 CUDA forward keeps for backward (memory allocated after the forward,
    less before) and the forward + backward peak (max_memory_allocated); prints both errors for the record."""
    over = ["model.dim=1024", "model.n_layers=8", "model.n_heads=8", "model.ffn_hidden=2816", "model.vocab_size=32000",
            f"model.max_seq_len={seq_len}", f"data.seq_len={seq_len}", "train.precision=bf16"]
    cfg, recipe = load_run_config(TINY["llada"], over, 1)
    estimate = mp.activation_bytes(plan_cli.profile_model(recipe, cfg).measure_bucket(0, batch), set())
    with torch.device("cuda"):
        model = recipe.build_model(cfg).model.to(torch.bfloat16).train()
    step = plan_cli.training_step(recipe, cfg, 0, batch, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = step(model)
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - before
    print(f"seq {seq_len} x {batch}: estimate {estimate / 2**20:.1f} MiB, kept after forward {kept / 2**20:.1f} MiB "
          f"({estimate / kept - 1:+.1%}), forward+backward peak {peak / 2**20:.1f} MiB ({estimate / peak - 1:+.1%})")
    assert abs(estimate / kept - 1) < 0.15


def test_train_plan_flag_delegates_to_the_planner():
    out = subprocess.run([sys.executable, "launch/train.py", TINY["video_dit"], "--plan", "--gpu-memory", "1.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "64x64x17:8" in out.stdout and "does not fit" in out.stdout and "no bucket fits" in out.stdout

