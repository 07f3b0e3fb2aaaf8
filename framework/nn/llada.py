"""LLaDA masked-diffusion language model: a bidirectional Llama-style transformer with no time input.

With `causal=True` the same module is the autoregressive twin. Both accept per-row positions (left-padded
prompts) and a KVCache of earlier tokens: the AR twin decodes one token at a time from it, and the
Fast-dLLM-style decoders attend from the current block to a cached prefix (and suffix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.nn import sequence_parallel
from framework.nn.attention import attention, build_attention_mask
from framework.nn.checkpointing import CheckpointingMode, normalise_mode, run_block, should_checkpoint
from framework.nn.init import gathered_for_init
from framework.nn.layers import RMSNorm, SwiGLU
from framework.nn.rope import apply_rope, rope_frequencies


@dataclass
class LladaModelConfig:
    """Shape of the transformer; defaults are a CPU-tiny model."""

    vocab_size: int = 2048
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # key/value heads, fewer than n_heads for grouped-query attention; 0 = n_heads
    ffn_hidden: int = 683
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2); the output projection never has one
    tie_embeddings: bool = False
    mask_id: int = 4
    causal: bool = False  # True gives the autoregressive twin used for speed and quality comparisons
    init_std: float = 0.02
    # none | full | every_k (one block in every activation_checkpointing_every): blocks recomputed in
    # backward (8B SFT at 4096 tokens); true/false from older configs read as full/none.
    activation_checkpointing: CheckpointingMode = "none"
    activation_checkpointing_every: int = 2

    def __post_init__(self) -> None:
        self.activation_checkpointing = normalise_mode(self.activation_checkpointing,
                                                       self.activation_checkpointing_every)
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} (0 = n_heads)")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} must lie in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass
class KVCache:
    """Per-layer keys (RoPE already applied) and values of cached tokens, and which of them are real.

    keys[l], values[l]: (B, H_kv, Lc, head_dim); mask: (B, Lc) bool, False for padding. Because RoPE is
    applied before caching, cached tokens keep their own positions wherever they sit in the cache, so a
    cache may hold a prefix and a suffix of the sequence side by side.
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor

    def __len__(self) -> int:
        return self.mask.shape[1]

    def columns(self, index: Tensor) -> KVCache:
        """The cache restricted to token columns `index` (1-D long or bool over Lc)."""
        return KVCache([k[:, :, index] for k in self.keys], [v[:, :, index] for v in self.values],
                       self.mask[:, index])

    def rows(self, index: Tensor) -> KVCache:
        """The cache of batch rows `index` (1-D long or bool over B)."""
        return KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.mask[index])

    def extend(self, other: KVCache) -> KVCache:
        """This cache followed by `other` along the token axis."""
        return KVCache([torch.cat(p, dim=2) for p in zip(self.keys, other.keys)],
                       [torch.cat(p, dim=2) for p in zip(self.values, other.values)],
                       torch.cat((self.mask, other.mask), dim=1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional per-head qk RMSNorm and RoPE; n_kv_heads < n_heads shares each
    key/value head among n_heads / n_kv_heads consecutive query heads (grouped-query attention)."""

    def __init__(self, cfg: LladaModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.causal = cfg.n_heads, cfg.kv_heads, cfg.causal
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, L, dim), cos/sin: (max_len, head_dim) -> (B, L, dim) and this call's (k, v).

        mask: None (full attention, or causal for the AR twin with nothing cached) or the model's boolean
        mask over the keys attended, the past ones then this call's. positions: (B, L).
        """
        b, seq, dim = x.shape

        def heads(t: Tensor, n: int) -> Tensor:
            return t.view(b, seq, n, dim // self.n_heads).transpose(1, 2)

        q = heads(self.wq(x), self.n_heads)
        k, v = heads(self.wk(x), self.n_kv_heads), heads(self.wv(x), self.n_kv_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin, positions), apply_rope(k, cos, sin, positions)
        keys, values = (k, v) if past is None else (torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2))
        if self.n_kv_heads != self.n_heads:  # the cache keeps the few kv heads; expand only for the product
            group = self.n_heads // self.n_kv_heads
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        # Under train.sequence_parallel x is this rank's shard (LladaModel.forward decides): DeepSpeed's all-to-all
        # gives attention the whole sequence for n_heads / N heads; `mask` is over the whole sequence.
        attend = sequence_parallel.sharded_attention if sequence_parallel.active() else attention
        out = attend(q, keys, values, causal=self.causal and mask is None, mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, seq, dim)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, cfg: LladaModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: (B, L, dim) -> (B, L, dim) and this call's (k, v)."""
        attn_out, kv = self.attn(self.attn_norm(x), cos, sin, mask, positions, past)
        x = x + attn_out
        return x + self.ffn(self.ffn_norm(x)), kv


class LladaModel(nn.Module):
    """Token embedding -> n_layers blocks -> RMSNorm -> lm_head; predicts every position's token."""

    def __init__(self, cfg: LladaModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        with gathered_for_init(self):
            self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """Every matrix ~ N(0, init_std); norm gains stay 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        """cos, sin: (max_seq_len, head_dim) in float32."""
        if self.rope_cos.dtype != torch.float32 or self.rope_cos.is_meta:
            # module.to(bf16) (DeepSpeed's bf16 engine does it) also casts buffers, and transformers'
            # from_pretrained builds modules on the meta device: recompute rather than trust the buffer.
            # Computed once per device, not per forward (decoding runs hundreds of small forwards).
            device = self.embed.weight.device
            cached = getattr(self, "_rope_fp32", None)
            if cached is None or cached[0].device != device:
                cached = rope_frequencies(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device)
                self._rope_fp32 = cached
            return cached
        return self.rope_cos, self.rope_sin

    def hidden_states(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        past: KVCache | None = None,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, KVCache]:
        """Final-norm hidden states (B, L, dim) and the KVCache of these L tokens (under train.sequence_parallel,
        with no past: this rank's L / N tokens; `forward` gathers the logits).

        key_padding_mask: (B, L) True = real token of this call (padding keys are never attended).
        positions: (B, L) long, default 0..L-1 after the past (left padding needs its own).
        past: cached earlier tokens, attended as keys before this call's (causal order for the AR twin).
        attn_mask: (L, L_keys) or (B, L, L_keys) bool, True = may attend, applied on top of the rest (the
        attention-mask annealing of an AR model's adaptation, objectives.masked_*).
        """
        b, seq_len = input_ids.shape
        offset = 0 if past is None else len(past)
        if positions is None and offset:
            positions = torch.arange(offset, offset + seq_len, device=input_ids.device).expand(b, seq_len)
        last = offset + seq_len if positions is None else int(positions.max()) + 1
        if last > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {last} exceeds max_seq_len={self.cfg.max_seq_len}")
        cur_mask = torch.ones(b, seq_len, dtype=torch.bool, device=input_ids.device) \
            if key_padding_mask is None else key_padding_mask.to(torch.bool)
        keys_mask = cur_mask if past is None else torch.cat((past.mask, cur_mask), dim=1)
        padded = key_padding_mask is not None or (past is not None and not bool(past.mask.all()))
        # No mask keeps SDPA (or flash-attn) on its fast path (training, plain decoding); otherwise one mask
        # for all layers. A causal query behind cached keys needs the bottom-right causal mask.
        mask = None
        if padded or doc_ids is not None or (self.cfg.causal and past is not None and seq_len > 1):
            mask = build_attention_mask(seq_len, offset + seq_len, causal=self.cfg.causal,
                                        key_padding_mask=keys_mask if padded else None, doc_ids=doc_ids,
                                        device=input_ids.device)
        if attn_mask is not None:
            extra = attn_mask.to(device=input_ids.device, dtype=torch.bool)
            extra = extra[None, None] if extra.dim() == 2 else extra[:, None]
            if mask is None and self.cfg.causal:  # the causal flag only applies when no mask is given
                mask = build_attention_mask(seq_len, offset + seq_len, causal=True, device=input_ids.device)
            mask = extra if mask is None else mask & extra
        cos, sin = self._rope_tables()
        x = self.embed(input_ids)
        if sequence_parallel.active():  # this rank's 1/N of the tokens, at their positions in the full row
            if positions is None:
                positions = torch.arange(seq_len, device=input_ids.device).expand(b, seq_len)
            x, positions = sequence_parallel.shard(x, 1), sequence_parallel.shard(positions, 1)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            layer_past = None if past is None else (past.keys[i], past.values[i])
            # Activations of long rows dwarf a block's weights; recomputing them costs one more forward.
            recompute = self.training and torch.is_grad_enabled() and should_checkpoint(
                self.cfg.activation_checkpointing, self.cfg.activation_checkpointing_every, i)
            x, (k, v) = run_block(block, x, cos, sin, mask, positions, layer_past, checkpoint=recompute)
            keys.append(k)
            values.append(v)
        return self.norm(x), KVCache(keys, values, cur_mask)

    def forward(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        *,
        positions: Tensor | None = None,
        past: KVCache | None = None,
        return_cache: bool = False,
        logits_range: tuple[int, int] | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """input_ids: (B, L) -> logits (B, L, vocab) [and the KVCache of these tokens when return_cache].

        logits_range (lo, hi): only columns lo..hi-1 go through lm_head (a decoder reading one block
        skips most of the (L, vocab) matmul, which dominates at a large vocabulary).
        attn_mask: an explicit boolean attention mask (see hidden_states).
        """
        # Sequence parallel for whole rows; decoding with a cache runs whole on every rank of the group.
        split = (sequence_parallel.active() and past is None and not return_cache
                 and input_ids.shape[1] % sequence_parallel.size() == 0)
        if sequence_parallel.active() and self.training and not split:  # a recomputed block would see a shard
            sequence_parallel.check_divisible(input_ids.shape[1], sequence_parallel.size(), "a training row")
        if split:  # lm_head on the shard, then gather: its weights see each token once
            logits = sequence_parallel.gather(self.lm_head(self.hidden_states(
                input_ids, key_padding_mask, doc_ids, positions=positions, attn_mask=attn_mask)[0]), 1)
            return logits if logits_range is None else logits[:, logits_range[0]:logits_range[1]]
        with sequence_parallel.unsharded():
            hidden, cache = self.hidden_states(input_ids, key_padding_mask, doc_ids, positions=positions, past=past,
                                               attn_mask=attn_mask)
            logits = self.lm_head(hidden if logits_range is None else hidden[:, logits_range[0]:logits_range[1]])
        return (logits, cache) if return_cache else logits



def count_parameters(cfg: LladaModelConfig) -> int:
    """Parameter count of LladaModel(cfg), computed from the shape alone (no allocation)."""
    d = cfg.dim
    attn = 2 * d * d + 2 * d * cfg.kv_heads * cfg.head_dim + (2 * cfg.head_dim if cfg.qk_norm else 0)
    attn += (d + 2 * cfg.kv_heads * cfg.head_dim) if cfg.qkv_bias else 0
    ffn = 3 * d * cfg.ffn_hidden
    block = attn + ffn + 2 * d  # two RMSNorm gains
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return embed + cfg.n_layers * block + d + head


def train_flops_per_token(cfg: LladaModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 n_layers dim seq_len.

    N excludes the embedding lookup (no matmul) but includes the lm_head matmul even when tied. The
    attention term 12 * n_layers * dim * seq_len (QK^T and AV, forward and backward) follows Kaplan et al.
    2020 / PaLM (Chowdhery et al. 2022); it counts full bidirectional attention, which is exact for LLaDA
    and an upper bound for the causal twin.
    """
    embed = cfg.vocab_size * cfg.dim
    # Tied: count_parameters holds the shared matrix once (as the embedding), yet the head matmul runs.
    n_matmul = count_parameters(cfg) - embed + (embed if cfg.tie_embeddings else 0)
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.dim * seq_len
