"""LLaDA masked-diffusion language model: a bidirectional Llama-style transformer with no time input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from framework.nn.attention import attention
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
    ffn_hidden: int = 683
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = False
    mask_id: int = 4
    causal: bool = False  # True gives the autoregressive twin used for speed and quality comparisons
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id={self.mask_id} must lie in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional per-head qk RMSNorm and RoPE."""

    def __init__(self, cfg: LladaModelConfig) -> None:
        super().__init__()
        self.n_heads, self.causal = cfg.n_heads, cfg.causal
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        key_padding_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """x: (B, L, dim), cos/sin: (L, head_dim) -> (B, L, dim)."""
        b, seq, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(b, seq, self.n_heads, dim // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, doc_ids=doc_ids)
        return self.wo(out.transpose(1, 2).reshape(b, seq, dim))


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
        key_padding_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """x: (B, L, dim) -> (B, L, dim)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, key_padding_mask, doc_ids)
        return x + self.ffn(self.ffn_norm(x))


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

    def _rope_tables(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """cos, sin: (seq_len, head_dim) in float32."""
        if self.rope_cos.dtype != torch.float32:
            # module.to(bf16) (DeepSpeed's bf16 engine does it) also casts buffers; far positions need fp32.
            cos, sin = rope_frequencies(self.cfg.head_dim, seq_len, self.cfg.rope_theta, self.rope_cos.device)
            return cos, sin
        return self.rope_cos[:seq_len], self.rope_sin[:seq_len]

    def forward(
        self,
        input_ids: Tensor,
        key_padding_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids: (B, L) -> logits (B, L, vocab). key_padding_mask, doc_ids: (B, L)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self._rope_tables(seq_len)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, key_padding_mask, doc_ids)
        return self.lm_head(self.norm(x))


def count_parameters(cfg: LladaModelConfig) -> int:
    """Parameter count of LladaModel(cfg), computed from the shape alone (no allocation)."""
    d = cfg.dim
    attn = 4 * d * d + (2 * cfg.head_dim if cfg.qk_norm else 0)
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
