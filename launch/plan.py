"""Memory plan of a preset, before any run: `python launch/plan.py PRESET [key=value ...] [--gpus N] [--gpu-memory GiB]`.

Per rank: weights, gradients and optimizer state for the preset's ZeRO stage and offload, and the activations of
each bucket (video: each data.buckets entry "HxWxF:B"; text: data.seq_len x train.micro_batch) measured by one
forward on the `meta` device (nothing allocated, so 8B / 14B presets plan on a laptop; block diffusion's forward
over [noised ; clean] with its mask); the frozen helpers (text encoder, VAE) whose folders exist, counted from their
configs; for video_distill the student and frozen teacher as the teacher run's config (or, before it is trained,
its video_dit preset) says, and the peak of one no-grad teacher forward; the total against the
GPU's memory, the largest bucket that fits, and for the others the cheapest change that makes them fit.
The arithmetic is framework/memory_plan.py; this file only builds each recipe's model and inputs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import sys
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from framework import memory_plan as mp
from framework.config import ConfigError
from framework.data.buckets import parse_buckets
from framework.recipe import load_run_config

GIB = mp.GIB


# ---- what the config says about checkpointing and sequence parallelism --------------------------------------
def checkpointing_mode(cfg) -> str:
    """`activation_checkpointing` (none | full | every_k) of the model config, model.wan's for Wan: the first
    value that is not none, else none."""
    def modes(node):
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                yield from ([value] if f.name == "activation_checkpointing" else modes(value))
    return next((m for m in modes(cfg.model) if m != "none"), "none")


def checkpointing_every(cfg) -> int:
    """The k of every_k (`activation_checkpointing_every` beside the mode checkpointing_mode read)."""
    def ks(node):
        if dataclasses.is_dataclass(node):
            if getattr(node, "activation_checkpointing", "none") != "none":
                yield getattr(node, "activation_checkpointing_every", 2)
            for f in dataclasses.fields(node):
                yield from ks(getattr(node, f.name))
    return next(ks(cfg.model), 2)


def sequence_parallel(cfg) -> int:
    """train.sequence_parallel once item 1 of issue 13 lands; 1 until then."""
    return int(getattr(cfg.train, "sequence_parallel", 1) or 1)


def without_checkpointing(tree):
    """A copy of a config (sub)tree with every `activation_checkpointing` set to False: the planner measures the
    plain forward and computes the checkpointed modes from it (a checkpointed block hides what it saves)."""
    tree = copy.deepcopy(tree)

    def clear(node):
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                if f.name == "activation_checkpointing":
                    setattr(node, f.name, "none")
                else:
                    clear(getattr(node, f.name))
    clear(tree)
    return tree


# ---- per recipe: buckets and one training forward + loss on meta ------------------------------------------
def buckets(cfg, recipe) -> list[tuple[str, int]]:
    """(label, micro-batch) per bucket."""
    if recipe.name == "llada":
        return [(f"{cfg.data.seq_len} tokens x {cfg.train.micro_batch}", cfg.train.micro_batch)]
    return [(spec, parse_buckets([spec])[0].batch_size) for spec in cfg.data.buckets]


def _input(*shape, dtype=torch.float32, device="meta"):
    """An input tensor; on meta nothing is allocated, elsewhere (tests' real forward) standard normal values."""
    if device == "meta":
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.randn(*shape, dtype=dtype, device=device)


def _text(model, cfg, b: int, device):
    """Caption states as training sees them: the model's trainable encoder run on max-length captions, or the
    frozen helper's output (a fixed input, no saved activations of its own)."""
    encoder = getattr(model, "text_encoder", None)
    if encoder is not None:
        return encoder(["x" * cfg.text.max_len] * b)
    mask = torch.ones(b, cfg.text.max_len, dtype=torch.bool, device=device)
    return _input(b, cfg.text.max_len, cfg.model.text_dim, device=device), mask


def training_step(recipe, cfg, bucket: int, b: int, device: str = "meta"):
    """run(model) -> loss: the forward and loss one micro-batch of the bucket costs, on meta tensors. Losses are
    the recipes' in kind (cross-entropy over fp32 logits, MSE in fp32), not their masking details. `device`
    other than meta runs the same step on real tensors (the tests compare both)."""
    name = recipe.name

    def tensor(*shape, dtype=torch.float32):
        return _input(*shape, dtype=dtype, device=device)

    if name == "llada" and cfg.objective.name == "block_diffusion":
        return _block_diffusion_step(cfg, b, device)
    if name == "llada":
        def run(model):
            ids = torch.zeros(b, cfg.data.seq_len, dtype=torch.long, device=device)
            logits = model(ids)
            return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    elif name in ("video_dit", "video_distill"):  # the distillation student trains as the DiT does
        def run(model):
            x = tensor(b, *recipe.latent_shape(cfg, bucket))
            text, mask = _text(model, cfg, b, device)
            return F.mse_loss(model(x, tensor(b), text, mask).float(), x)
    elif name == "video_audio":
        def run(model):
            (cv, *thw), (ca, ta) = recipe.latent_shapes(cfg, bucket)
            v, a = tensor(b, cv, *thw), tensor(b, ca, ta)
            text, mask = _text(model, cfg, b, device)
            pv, pa = model(v, a, tensor(b), tensor(b), text, mask)
            return F.mse_loss(pv.float(), v) + F.mse_loss(pa.float(), a)
    elif name == "video_vae":
        def run(model):
            spec = parse_buckets([cfg.data.buckets[bucket]])[0]
            x = tensor(b, 3, spec.frames, spec.height, spec.width)
            x_hat, mean, logvar = model(x, gen=torch.Generator())
            return F.mse_loss(x_hat.float(), x) + (mean.float().pow(2) + logvar.float().exp()).mean()
    elif name == "audio_vae":
        def run(model):
            spec = parse_buckets([cfg.data.buckets[bucket]])[0]
            samples = round(spec.seconds(cfg.data.fps) * cfg.mel.rate)
            x = tensor(b, cfg.mel.n_mels, samples // cfg.mel.hop)  # stft_magnitude keeps S // hop frames
            x_hat, mean, logvar = model(x, gen=torch.Generator())
            return F.l1_loss(x_hat.float(), x) + (mean.float().pow(2) + logvar.float().exp()).mean()
    else:
        raise ConfigError(f"recipe {name!r}: the memory planner does not know its inputs yet")
    return run


class _KnownMax(TorchFunctionMode):
    """`positions.max()` of a meta long tensor is `value` (meta tensors hold no values, and the model reads the
    largest position to check max_seq_len); every other call runs as it is."""

    def __init__(self, value: int):
        super().__init__()
        self.value = value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func is torch.Tensor.max and len(args) == 1 and not kwargs and args[0].is_meta
                and not args[0].is_floating_point()):
            return torch.tensor(self.value)
        return func(*args, **(kwargs or {}))


def _block_diffusion_step(cfg, b: int, device: str):
    """BD3-LM's training forward as recipes/llada/objectives.block_diffusion runs it (block_logits): one pass over
    [noised ; clean], 2 x data.seq_len tokens, under an explicit block-causal mask, so SDPA takes its masked path
    (no flash kernel: the memory-efficient one on GPUs, which saves the mask made additive in every layer)."""
    from recipes.llada.objectives import block_logits

    length, sft = cfg.data.seq_len, cfg.data.kind == "sft"
    # SFT rows hide a random tail (sft.random_length) and packed documents attend within themselves
    # (data.doc_attention): both make the mask per row, (B, 2L, 2L) instead of (2L, 2L).
    key_real = sft and cfg.sft.random_length
    doc_ids = not sft and cfg.data.doc_attention

    def run(model):
        ids = torch.zeros(b, length, dtype=torch.long, device=device)
        real = torch.ones(b, length, dtype=torch.bool, device=device) if key_real else None
        docs = torch.zeros(b, length, dtype=torch.long, device=device) if doc_ids else None
        with _KnownMax(length - 1):  # the clean copy repeats positions 0..L-1
            logits = block_logits(cfg, model, ids, ids, real, docs)
        return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    return run


def teacher_step(recipe, cfg, bucket: int, b: int, device: str = "meta"):
    """run(teacher) -> its output: the largest no-grad forward of video_distill's teacher_targets for one
    micro-batch. Guidance batches the conditional and null halves (flow.euler_sample through guidance.guided):
    one forward over 2B rows when every row falls in one segment (B at distill.cfg_scale 1), after the teacher's
    own caption encoding. Each Euler step's forward is freed before the next: one forward's peak counts."""
    rows = b if cfg.distill.cfg_scale == 1.0 else 2 * b

    def run(teacher):
        x = _input(b, *recipe.latent_shape(cfg, bucket), device=device)
        text, mask = _text(teacher, cfg, b, device)
        if rows > b:
            x, text, mask = torch.cat([x, x]), torch.cat([text, text]), torch.cat([mask, mask])
        return teacher(x, _input(rows, device=device), text, mask)
    return run


@dataclasses.dataclass
class ModelProfile:
    params: int
    largest_layer: int
    frozen: int
    n_blocks: int
    measure_bucket: object  # (bucket index, micro-batch) -> SavedProfile, cached
    teacher_params: int = 0  # video_distill: the frozen teacher (the student's architecture, whole on every rank)
    teacher_peak: object = None  # (bucket index, micro-batch) -> bytes of its no-grad forward's peak, cached


def profile_model(recipe, cfg) -> ModelProfile:
    """Build the model on meta (no weights allocated) in the training dtype, and a cached measurer."""
    plain = without_checkpointing(cfg)
    with torch.device("meta"):
        model = recipe.build_model(plain).model
        if getattr(getattr(cfg, "lora", None), "rank", 0) > 0:  # as the trainer does: adapters in, base frozen
            from framework import lora

            lora.apply(model, plain)
    if cfg.train.precision == "bf16":
        model = model.to(torch.bfloat16)  # DeepSpeed's bf16 engine casts the module the same way
    model.train()
    params, largest, frozen = mp.count_params(model)
    blocks = mp.find_blocks(model)
    cache: dict = {}

    def measure(bucket: int, b: int) -> mp.SavedProfile:
        if (bucket, b) not in cache:
            cache[bucket, b] = mp.measure_saved(model, training_step(recipe, plain, bucket, b), blocks)
        return cache[bucket, b]
    prof = ModelProfile(params, largest, frozen, len(blocks), measure)
    if recipe.name == "video_distill":
        prof.teacher_params, prof.teacher_peak = profile_teacher(recipe, plain)
    return prof


def profile_teacher(recipe, cfg) -> tuple[int, object]:
    """video_distill's frozen teacher, built on meta as the recipe holds it (the student's architecture, eval, no
    grads, the compute dtype): its parameter count and a cached measurer of its no-grad forward's peak."""
    from recipes.video_dit.recipe import compute_dtype

    with torch.device("meta"):
        teacher = recipe.build_model(cfg).model
    teacher = teacher.requires_grad_(False).eval().to(compute_dtype(cfg))
    cache: dict = {}

    def peak(bucket: int, b: int) -> int:
        if (bucket, b) not in cache:
            run = teacher_step(recipe, cfg, bucket, b)
            cache[bucket, b] = mp.measure_peak(lambda: run(teacher))
        return cache[bucket, b]
    return _count(teacher), peak


# ---- video_distill: the student's model comes from its teacher -------------------------------------------------
def teacher_preset(teacher: str) -> str | None:
    """The video_dit preset whose run dir (run_dir, else runs/<preset name>) is `teacher`: the run that trains it."""
    from framework.config import read_preset

    target = Path(teacher).resolve()
    for preset in sorted(Path(__file__).resolve().parents[1].glob("recipes/video_dit/configs/*.yaml")):
        run_dir = read_preset(str(preset)).get("run_dir") or f"runs/{preset.stem}"
        if Path(run_dir).resolve() == target:
            return str(preset)
    return None


def distill_student(cfg, recipe, world: int) -> str:
    """Where a video_distill student's model, text, VAE and diffusion come from. The recipe adopts them from the
    teacher run's config when it loads the config; before the teacher is trained (a fresh clone) from the video_dit
    preset that trains it, adopted the same way; else a one-line ConfigError naming the missing path."""
    from recipes.video_distill.recipe import adopt_teacher

    teacher = cfg.distill.teacher
    if Path(teacher).exists():
        return f"student and frozen teacher: the architecture of the teacher run {teacher} (its config)"
    preset = teacher_preset(teacher)
    if preset is None:
        raise ConfigError(f"distill.teacher: {teacher} does not exist and no recipes/video_dit/configs preset trains "
                          f"it (run_dir): train the teacher first, or set distill.teacher to its run dir")
    teacher_cfg, _ = load_run_config(preset, [], world)
    adopt_teacher(cfg, dataclasses.asdict(teacher_cfg))
    recipe.validate(cfg, world)  # the adopted sections checked as the recipe checks a teacher run's
    return (f"student and frozen teacher: the architecture of {Path(preset).relative_to(Path(preset).parents[3])}, "
            f"the preset of the teacher run {teacher} (not there yet)")


# ---- frozen helpers: counted from their folders' configs, built on meta ---------------------------------------
def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def text_encoder_params(path: str) -> int:
    """A T5 / UMT5 encoder folder's parameters, from its config.json alone."""
    from transformers import AutoConfig, T5EncoderModel, UMT5EncoderModel

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return _count((UMT5EncoderModel if config.model_type == "umt5" else T5EncoderModel)(config))


def vae_params(path: str) -> int | None:
    """A diffusers AutoencoderKLWan folder's parameters (config.json alone), or an export's (its tensor shapes);
    None where neither is there yet."""
    from recipes.video_dit.vae_ref import is_wan_folder

    if is_wan_folder(path):
        from diffusers import AutoencoderKLWan

        with torch.device("meta"):
            return _count(AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(path)))
    weights = Path(path) / "model.safetensors"
    if not path or not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def vae_keeps_fp32(path: str) -> bool:
    from recipes.video_dit.vae_ref import WanVAE, is_wan_folder

    return bool(path) and is_wan_folder(path) and WanVAE.frozen_dtype == torch.float32


def frozen_helpers(cfg) -> tuple[list[tuple[str, int]], list[str]]:
    """([(key, parameters)] of the frozen helpers whose folders exist, [keys of those not there yet]): every rank
    holds them whole, in the compute dtype, once it encodes (online latents, captions, evaluation prompts)."""
    counted, missing = [], []
    text = getattr(getattr(cfg, "text", None), "encoder", None)
    if text is not None and text != "bytes":
        if text and (Path(text) / "config.json").is_file():
            counted.append(("text.encoder", text_encoder_params(text)))
        else:
            missing.append("text.encoder")
    for key in ("vae", "audio_vae"):
        path = getattr(getattr(cfg, key, None), "path", None)
        if path is not None:
            n = vae_params(path)
            if n is None:
                missing.append(f"{key}.path")
            else:
                counted.append((f"{key}.path", n))
    return counted, missing


# ---- the report ---------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def plan(preset: str, overrides: list[str], gpus: int, gpu_memory: float | None) -> list[str]:
    """The plan's printable lines (also what the tests read)."""
    world = world_to_check(preset, overrides, gpus)
    cfg, recipe = load_run_config(preset, overrides, world)
    source = distill_student(cfg, recipe, world) if recipe.name == "video_distill" else None
    capacity = int((gpu_memory if gpu_memory is not None else default_gpu_memory()) * GIB)
    prof = profile_model(recipe, cfg)
    t = cfg.train
    base = mp.Setting(gpus=gpus, zero_stage=t.zero_stage, offload=t.offload_optimizer,
                      checkpointing=checkpointing_mode(cfg), every_k=checkpointing_every(cfg),
                      sp=sequence_parallel(cfg), precision=t.precision)
    counted, missing = frozen_helpers(cfg)
    compute_bytes = 2 if t.precision == "bf16" else 4
    vae_path = getattr(getattr(cfg, "vae", None), "path", "") or ""
    # A diffusers Wan VAE stays fp32 in bf16 runs (WanVAE.frozen_dtype); every other helper takes the compute dtype.
    if prof.teacher_params:  # video_distill's frozen teacher: a helper in the compute dtype (recipe.teacher)
        counted.append(("distill.teacher", prof.teacher_params))
    helper_bytes = sum(n * (4 if key == "vae.path" and vae_keeps_fp32(vae_path) else compute_bytes)
                       for key, n in counted)
    frozen = f" + {prof.frozen:,} frozen" if prof.frozen else ""
    lines = [f"{preset}: recipe {recipe.name}, {prof.params:,} trainable{frozen} parameters (largest layer "
             f"{prof.largest_layer:,}), {prof.n_blocks} blocks; {gpus} GPU(s) of {capacity / GIB:.1f} GiB, "
             f"ZeRO {base.zero_stage}{' + optimizer offload' if base.offload else ''}, {t.precision}, "
             f"activation checkpointing {base.checkpointing}, sequence parallel {base.sp} (data parallel {base.dp})",
             *([source] if source else []),
             "per rank, GiB:",
             f"{'bucket':<24}{'weights':>9}{'grads':>9}{'optim':>9}{'gather':>9}{'helpers':>9}{'activ':>9}"
             + (f"{'teacher':>9}" if prof.teacher_peak else "") + f"{'overhd':>9}{'total':>9}  verdict"]
    results = []
    for i, (label, b) in enumerate(buckets(cfg, recipe)):
        setting = dataclasses.replace(base, micro_batch=b)
        measure = functools.partial(prof.measure_bucket, i)
        transient = functools.partial(prof.teacher_peak, i) if prof.teacher_peak else None
        est = mp.estimate(setting, prof.params, prof.largest_layer, prof.n_blocks, measure, prof.frozen,
                          helper_bytes, transient)
        s = est.states
        ok = est.fits(capacity)
        results.append((label, est, ok, setting, measure, transient))
        lines.append(f"{label:<24}{gib(s.weights)}{gib(s.grads)}{gib(s.optimizer)}{gib(s.gathered)}"
                     f"{gib(est.helpers)}{gib(est.activations)}" + (gib(est.transient) if transient else "")
                     + f"{gib(est.overhead)}{gib(est.total)}  {'fits' if ok else 'does not fit'}")
    if any(r[1].states.cpu for r in results):
        lines.append(f"host memory per rank (offloaded optimizer + fp32 gradients): {results[0][1].states.cpu / GIB:.2f} GiB")
    lines.append(f"assumed overhead: {mp.CUDA_CONTEXT_BYTES / GIB:.0f} GiB CUDA context and workspaces + "
                 f"{mp.FRAGMENTATION:.0%} of states, helpers and activations for fragmentation; activations = bytes "
                 f"saved for backward (flash-attention kernels)"
                 + ("; block diffusion: one forward over [noised ; clean] = 2 x data.seq_len tokens under its "
                    "block-causal mask (saved per layer, additive)" if getattr(getattr(cfg, "objective", None), "name",
                                                                          "") == "block_diffusion" else ""))
    if prof.teacher_peak:
        lines.append(f"distill.teacher (frozen, no grads or optimizer): {prof.teacher_params:,} parameters in "
                     f"{t.precision} among the helpers; 'teacher' = the peak of one no-grad guided teacher forward "
                     f"(2 x micro-batch rows), freed before the student's forward: the larger of it and 'activ' counts")
    if counted or missing:
        kept = " (fp32)" if vae_keeps_fp32(vae_path) else ""
        lines.append("frozen helpers (whole on every rank, " + t.precision + "): "
                     + ", ".join(f"{k} {n:,} parameters{kept if k == 'vae.path' else ''}" for k, n in counted)
                     + ("; " if counted and missing else "")
                     + (f"not counted: {', '.join(missing)} (not there yet; a Wan preset's come with "
                        f"train.init_from=PIPELINE)" if missing else ""))
    fitting = [r for r in results if r[2]]
    if fitting:
        largest = max(fitting, key=lambda r: r[1].working)
        lines.append(f"largest bucket that fits: {largest[0]} ({largest[1].total / GIB:.2f} of {capacity / GIB:.1f} GiB)")
    else:
        lines.append("no bucket fits as configured")
    for label, _, ok, setting, measure, transient in results:
        if ok:
            continue
        found = mp.cheapest_fit(setting, prof.params, prof.largest_layer, prof.n_blocks, measure, capacity,
                                frozen=prof.frozen, helpers=helper_bytes, transient=transient)
        lines.append(f"{label}: fits with {found[0]} ({found[1].total / GIB:.2f} GiB)" if found
                     else f"{label}: no setting the planner tries makes it fit")
    return lines


def world_to_check(preset: str, overrides: list[str], gpus: int) -> int:
    """The world size the config is validated at: one sequence-parallel group when --gpus holds whole groups (the
    batch split over data-parallel ranks is not the planner's business), else --gpus, which load_run_config then
    refuses naming train.sequence_parallel."""
    from framework.config import apply_overrides, read_preset

    train = apply_overrides(read_preset(preset), overrides).get("train") or {}
    sp = train.get("sequence_parallel", 1) if isinstance(train, dict) else 1
    return sp if isinstance(sp, int) and sp >= 1 and gpus % sp == 0 else gpus  # else load_run_config names it


def default_gpu_memory() -> float:
    """The first GPU's memory in GiB where CUDA exists, else 80 (an 80 GB-class card)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return 80.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="YAML preset, e.g. recipes/llada/configs/8b.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--gpus", type=int, default=1, help="world size (ranks) to plan for")
    parser.add_argument("--gpu-memory", type=float, default=None,
                        help="GiB per GPU (default: this machine's GPU, else 80)")
    parser.add_argument("--plan", action="store_true", help=argparse.SUPPRESS)  # launch/train.py --plan delegates
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # overrides may follow --gpus N
    if args.gpus < 1:
        print("config error: --gpus must be >= 1", file=sys.stderr)
        return 2
    try:
        lines = plan(args.preset, args.overrides, args.gpus, args.gpu_memory)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, NotImplementedError) as e:  # the model refused the shape (a bucket, seq_len)
        print(f"error: {args.preset}: the planner's meta forward failed: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
