"""Text encoders for the video DiT: a small trainable byte-level one, or a frozen T5/UMT5 from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from framework.nn.dit import Attention


def encode_bytes(captions: list[str], max_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes + 1 as ids (0 = padding) -> ids (B, S), mask (B, S) True where a byte is."""
    rows = [list(c.encode("utf-8")[:max_len]) for c in captions]
    length = max(1, max(len(r) for r in rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long) + 1
    ids = ids.to(device)
    return ids, ids > 0


class TextBlock(nn.Module):
    """Pre-norm bidirectional self-attention + MLP over caption tokens (padding masked as keys)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), key_padding_mask=mask)
        return h + self.mlp(self.norm2(h))


class ByteTextEncoder(nn.Module):
    """A trainable encoder for short captions: byte embeddings + a few bidirectional transformer layers.

    Enough for the embedded shapes dataset, where captions are a handful of words; no tokenizer to ship.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        # Our own blocks, not nn.TransformerEncoder: it deep-copies one layer, and nn.MultiheadAttention reads
        # out_proj.weight without calling out_proj, both of which break ZeRO-3's parameter gathering.
        self.layers = nn.ModuleList(TextBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> hidden (B, S, dim), mask (B, S)."""
        ids, mask = encode_bytes(captions, self.max_len, self.embed.weight.device)
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h), mask


class HFTextEncoder(nn.Module):
    """A frozen T5 / UMT5 encoder and its tokenizer, loaded from a local folder (no hub access)."""

    def __init__(self, path: str, max_len: int = 128):
        super().__init__()
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model.text_encoder: no config.json in {path} (a local T5/UMT5 folder)")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}.get(config.model_type)
        if cls is None:
            raise ValueError(f"model.text_encoder: {path} holds a '{config.model_type}' model; T5 or UMT5 expected")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = cls.from_pretrained(path, local_files_only=True)
        self.max_len = max_len
        self.hidden_size = config.d_model

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device).bool()
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask
