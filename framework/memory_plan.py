"""Memory planner: per-rank GPU memory of a training setting, before any run.

Three parts, each a plain function:
- model states (weights, gradients, optimizer) from the parameter count, by DeepSpeed ZeRO's rules
  (cross-checked against `estimate_zero2/3_model_states_mem_needs` in tests/unit/test_memory_plan.py);
- activations = the bytes autograd saves for backward, MEASURED by one forward on the `meta` device at the
  real shape and dtype under `saved_tensors_hooks` (no memory is allocated), attributed per block so that
  activation checkpointing and sequence parallelism are computed from one measurement; no-grad forwards that
  run before it (a distillation teacher's) by their peak of live tensors (`measure_peak`), the larger counting;
- the fit search: the cheapest change of setting that makes a bucket fit, each candidate checked by the
  same estimator.

Nothing here knows a recipe: the caller gives the model, its transformer blocks and a `run(model) -> loss`.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3

# Assumptions stated on every plan: what a rank holds besides model states and activations.
CUDA_CONTEXT_BYTES = 2 * GIB  # CUDA context, cuBLAS / NCCL workspaces, DeepSpeed's reduce buckets
FRAGMENTATION = 0.10  # caching-allocator fragmentation margin on model states + activations


# ---- model states ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes. gpu = weights + grads + optimizer + gathered; cpu = what offload moved to host memory."""

    weights: int
    grads: int
    optimizer: int
    gathered: int  # ZeRO-3: the largest layer's full weights and gradients while it runs
    cpu: int

    @property
    def gpu(self) -> int:
        return self.weights + self.grads + self.optimizer + self.gathered


def model_state_bytes(params: int, largest_layer: int, stage: int, dp: int, precision: str = "bf16",
                      offload: bool = False, frozen: int = 0) -> ModelStates:
    """Weights, gradients and AdamW state per rank for `params` trainable parameters sharded over `dp` ranks.

    Per parameter (DeepSpeed's accounting): weights w bytes (2 bf16, 4 fp32); gradients w bytes, plus an fp32
    gradient partition when w < 4; optimizer fp32 master + Adam m and v = 12. Stage >= 1 shards the optimizer
    and fp32 gradients, stage >= 2 the low-precision gradients, stage 3 the weights (plus the largest layer
    gathered, its weights and gradients; its gradients are one fp32 partition). `frozen` parameters (LoRA's base)
    cost weights only. Offload keeps optimizer and fp32 gradients in host memory and the
    gradients leave the GPU as they are reduced (DeepSpeed's estimator counts none on the GPU).
    """
    w = 2 if precision == "bf16" else 4
    grad32 = 4 if w < 4 else 0
    shard = max(dp, 1)
    weights = (params + frozen) * w // (shard if stage == 3 else 1)
    low_grads = params * w // (shard if stage >= 2 else 1)
    opt_part = params * (12 + grad32) // (shard if stage >= 1 else 1)
    gathered = largest_layer * 2 * w if stage == 3 else 0
    if offload:
        return ModelStates(weights, 0, 0, gathered, opt_part)
    grads = low_grads + params * grad32 // (shard if stage >= 1 else 1)
    if stage == 3:
        # Stage 3 reduce-scatters the 16-bit gradients straight into the fp32 partition: one 4-byte copy, as
        # DeepSpeed's estimate_zero3_model_states_mem_needs counts it (18 bytes per parameter in all, sharded).
        grads = params * 4 // shard
    return ModelStates(weights, grads, params * 12 // (shard if stage >= 1 else 1), gathered, 0)


def count_params(model: nn.Module) -> tuple[int, int, int]:
    """(trainable, largest layer's own (as DeepSpeed's `model_to_params` counts it), frozen) parameters."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest, frozen


# ---- activations, measured -----------------------------------------------------------------------------------
@dataclass
class SavedProfile:
    """What one forward saved for backward, in bytes of unique storages (parameters excluded).

    outside: saved outside every block (embeddings, loss, inputs); blocks[i]: saved while block i ran;
    shared_inputs: block arguments that something saved too (rope tables, text states, the residual stream
    between blocks): alive whether or not blocks are checkpointed; block_inputs[i]: block i's other tensor
    arguments, which only a checkpointed block keeps; masks[i]: the explicit attention masks among blocks[i] (as
    SDPA's masked kernels save them, additive), which sequence parallelism does not split (on meta only).
    """

    outside: int = 0
    blocks: list[int] = field(default_factory=list)
    block_inputs: list[int] = field(default_factory=list)
    shared_inputs: int = 0
    masks: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Saved bytes without checkpointing."""
        return self.outside + self.shared_inputs + sum(self.blocks)


def _storage_key(t: torch.Tensor) -> int:
    # The StorageImpl pointer: equal for views of one storage, distinct per allocation, defined on meta too.
    return t.untyped_storage()._cdata


class _FlashLikeAttention(TorchFunctionMode):
    """On meta, SDPA takes the math path and would save the (L x L) scores; training on GPUs runs flash /
    memory-efficient kernels that save q, k, v, out and the log-sum-exp. Route SDPA to the CPU flash kernel,
    which saves exactly those (and is what a real CPU forward without a mask runs), so meta equals the GPU.
    With an explicit mask (no flash kernel on GPUs) the memory-efficient kernel saves the additive mask too, as the
    CPU kernel does: given `masks`, it is recorded there by storage (and held, so no later tensor reuses its address;
    measure_peak gives none, since holding them would change the peak it measures)."""

    def __init__(self, masks: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.masks = masks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].is_meta and not kwargs.get("enable_gqa"):
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if mask is not None and mask.dtype == torch.bool:  # SDPA turns a bool mask into an additive one first
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            if mask is not None and self.masks is not None:
                self.masks[_storage_key(mask)] = mask
            out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, bool(kwargs.get("is_causal", False)), attn_mask=mask, scale=kwargs.get("scale"))
            return out
        return func(*args, **kwargs)


def measure_saved(model: nn.Module, run: Callable[[nn.Module], torch.Tensor],
                  blocks: Iterable[nn.Module] = ()) -> SavedProfile:
    """Bytes autograd saves for backward during `run(model)` (one forward and the loss), per block.

    Each storage counts once (views and tensors saved twice share it); parameters never count (they are model
    states). Works on any device; on `meta` it allocates nothing. Activation checkpointing inside the model must
    be off here: the analytic modes below are computed from this one profile.
    """
    blocks = list(blocks)
    params = {_storage_key(p) for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, block index or -1)
    arguments: dict[int, tuple[int, int]] = {}  # storage -> (bytes, first block taking it)
    keep: list[torch.Tensor] = []  # holds every storage seen, so none is freed and its address reused
    current = [-1]
    masks: dict[int, torch.Tensor] = {}  # the attention masks SDPA was given on meta, by storage

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in params and key not in saved:
            saved[key] = (t.untyped_storage().nbytes(), current[0])
            keep.append(t)
        return t

    def enter(i):
        def hook(module, args, kwargs):
            current[0] = i
            for a in (*args, *kwargs.values()):
                if torch.is_tensor(a) and _storage_key(a) not in params and _storage_key(a) not in arguments:
                    arguments[_storage_key(a)] = (a.untyped_storage().nbytes(), i)
                    keep.append(a)
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(enter(i), with_kwargs=True), b.register_forward_hook(leave))]
    try:
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _FlashLikeAttention(masks),
              torch.enable_grad()):
            run(model)
    finally:
        for h in handles:
            h.remove()
    profile = SavedProfile(blocks=[0] * len(blocks), block_inputs=[0] * len(blocks), masks=[0] * len(blocks))
    for key, (nbytes, owner) in saved.items():
        if key in arguments:
            profile.shared_inputs += nbytes
        elif owner >= 0:
            profile.blocks[owner] += nbytes
            profile.masks[owner] += nbytes if key in masks else 0
        else:
            profile.outside += nbytes
    for key, (nbytes, first) in arguments.items():
        if key not in saved:
            profile.block_inputs[first] += nbytes
    return profile


class _LivePeak(TorchDispatchMode):
    """Live bytes of the storages created since entry, and their peak: each output storage counts from the op
    that made it until it is freed (a weakref on the storage). An output on an input's storage (a view, an in-place
    op) allocated nothing: views of parameters or of the caller's inputs never count, views of new ones count once."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0
        self._alive: dict[int, weakref.finalize] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._alive and key not in inputs:
                    self.live += storage.nbytes()
                    self._alive[key] = weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def measure_peak(run: Callable[[], object]) -> int:
    """Peak bytes of the tensors a no-grad `run()` holds at once (what it allocates; its inputs made outside
    are not counted). For forwards that save nothing, e.g. a distillation teacher's: their cost is the largest
    set of intermediates alive together. Works on meta (nothing allocated); SDPA counted as flash kernels run it."""
    with torch.no_grad(), _FlashLikeAttention(), _LivePeak() as tracker:
        result = run()
    del result
    return tracker.peak


def checkpointed_blocks(mode: str, n_blocks: int, every_k: int = 2) -> set[int]:
    """Blocks whose activations are recomputed in backward: none, all (full), or one block in every k."""
    if mode == "none":
        return set()
    if mode == "full":
        return set(range(n_blocks))
    if mode == "every_k":
        return set(range(0, n_blocks, max(every_k, 1)))
    raise ValueError(f"activation checkpointing mode {mode!r} is not none, full or every_k")


def activation_bytes(profile: SavedProfile, checkpointed: set[int], sp: int = 1) -> int:
    """Peak saved-activation bytes per rank: checkpointed blocks keep only their inputs, and backward recomputes
    one of them at a time (its own saved bytes on top). Sequence parallelism of degree sp splits every
    token's activations sp ways (Ulysses: attention runs full length on heads / sp, same bytes), but not an
    explicit attention mask: every rank attends the whole sequence under the whole mask."""
    masks = profile.masks or [0] * len(profile.blocks)

    def per_rank(nbytes: int, unsplit: int) -> int:
        return -(-(nbytes - unsplit) // max(sp, 1)) + unsplit

    kept = profile.outside + profile.shared_inputs + sum(b for i, b in enumerate(profile.blocks) if i not in checkpointed)
    kept += sum(profile.block_inputs[i] for i in checkpointed)
    kept_masks = sum(m for i, m in enumerate(masks) if i not in checkpointed)
    recompute = max((per_rank(profile.blocks[i], masks[i]) for i in checkpointed), default=0)
    return per_rank(kept, kept_masks) + recompute


# ---- a plan ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    gpus: int
    zero_stage: int
    offload: bool
    checkpointing: str  # none | full | every_k
    sp: int = 1
    micro_batch: int = 1
    precision: str = "bf16"
    every_k: int = 2

    @property
    def dp(self) -> int:
        """Data-parallel replicas: world / sequence-parallel degree."""
        return max(self.gpus // max(self.sp, 1), 1)

    @property
    def zero_shards(self) -> int:
        """Ranks ZeRO partitions over: every rank holding the same parameters, i.e. the whole world under
        sequence parallelism too (DeepSpeed's engine hands ZeRO its seq_data_parallel_group, dp x sp ranks)."""
        return max(self.gpus, 1)


@dataclass(frozen=True)
class Estimate:
    setting: Setting
    states: ModelStates
    activations: int
    helpers: int = 0  # frozen helpers (VAE, text encoder, a teacher) held whole on every rank, outside ZeRO
    # Peak of no-grad forwards run before the training forward (a distillation teacher's): their intermediates
    # are freed before the student saves anything, so the larger of the two counts, not their sum.
    transient: int = 0

    @property
    def working(self) -> int:
        """Activation memory at the step's peak: the student's saved activations or the teacher's forward."""
        return max(self.activations, self.transient)

    @property
    def overhead(self) -> int:
        return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * (self.states.gpu + self.working + self.helpers))

    @property
    def total(self) -> int:
        return self.states.gpu + self.working + self.helpers + self.overhead

    def fits(self, gpu_memory: int) -> bool:
        return self.total <= gpu_memory


# measure(micro_batch) -> SavedProfile of one micro-batch at that size (the caller caches it).
Measure = Callable[[int], SavedProfile]
# transient(micro_batch) -> peak bytes of the no-grad forwards of one micro-batch (a teacher's), whole sequence.
Transient = Callable[[int], int]


def estimate(setting: Setting, params: int, largest_layer: int, n_blocks: int, measure: Measure,
             frozen: int = 0, helpers: int = 0, transient: Transient | None = None) -> Estimate:
    states = model_state_bytes(params, largest_layer, setting.zero_stage, setting.zero_shards, setting.precision,
                               setting.offload, frozen)
    ckpt = checkpointed_blocks(setting.checkpointing, n_blocks, setting.every_k) if n_blocks else set()
    # A sequence-parallel model shards its tokens in every forward, a no-grad one too.
    peak = -(-transient(setting.micro_batch) // max(setting.sp, 1)) if transient else 0
    return Estimate(setting, states, activation_bytes(measure(setting.micro_batch), ckpt, setting.sp), helpers, peak)


_LADDER: list[tuple[str, str, Callable[[Setting], Setting | None]]] = [
    # (kind, label, change): cheapest first, in speed lost per memory saved.
    ("ckpt", "activation checkpointing full", lambda x: dataclasses.replace(x, checkpointing="full")
     if x.checkpointing != "full" else None),
    ("zero", "ZeRO stage {zero_stage}", lambda x: dataclasses.replace(x, zero_stage=x.zero_stage + 1)
     if x.zero_stage < 3 else None),
    ("zero", "ZeRO stage {zero_stage}", lambda x: dataclasses.replace(x, zero_stage=x.zero_stage + 1)
     if x.zero_stage < 3 else None),
    ("offload", "offload optimizer", lambda x: dataclasses.replace(x, offload=True, zero_stage=max(x.zero_stage, 1))
     if not x.offload else None),
    *[("sp", "sequence parallel {sp}", lambda x: dataclasses.replace(x, sp=x.sp * 2)
       if x.gpus % (x.sp * 2) == 0 else None)] * 3,
    *[("micro", "micro-batch {micro_batch}", lambda x: dataclasses.replace(x, micro_batch=x.micro_batch // 2)
       if x.micro_batch > 1 else None)] * 6,
    *[("gpus", "{gpus} GPUs", lambda x: dataclasses.replace(x, gpus=x.gpus * 2))] * 10,
]


def _candidates(s: Setting, can_checkpoint: bool, max_gpus: int) -> list[tuple[str, Setting]]:
    """Each single change of the ladder, then the ladder applied cumulatively (every step so far kept)."""
    def ok(x: Setting | None) -> bool:
        return x is not None and x.gpus <= max_gpus and (can_checkpoint or x.checkpointing == s.checkpointing)

    single: list[tuple[str, Setting]] = []
    for _, label, change in _LADDER:
        x = change(s)
        if ok(x) and all(x != c for _, c in single):
            single.append((label.format(**dataclasses.asdict(x)), x))
    cumulative, cur, labels = [], s, {}
    for kind, label, change in _LADDER:
        x = change(cur)
        if ok(x):
            cur, labels[kind] = x, label.format(**dataclasses.asdict(x))
            cumulative.append((" + ".join(labels.values()), cur))
    return single + cumulative


def cheapest_fit(setting: Setting, params: int, largest_layer: int, n_blocks: int, measure: Measure,
                 gpu_memory: int, max_gpus: int = 4096, frozen: int = 0, helpers: int = 0,
                 transient: Transient | None = None) -> tuple[str, Estimate] | None:
    """The first candidate (cheapest first) whose estimate fits, with its estimate; None if none does."""
    for name, candidate in _candidates(setting, n_blocks > 0, max_gpus):
        est = estimate(candidate, params, largest_layer, n_blocks, measure, frozen, helpers, transient)
        if est.fits(gpu_memory):
            return name, est
    return None


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks activation checkpointing wraps: the ModuleList of one module class holding the
    most parameters (a text encoder's layers are a smaller list)."""
    best, best_n = [], -1
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = list(m), n
    return best
