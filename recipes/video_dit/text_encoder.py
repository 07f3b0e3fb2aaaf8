"""Text encoders for the video DiT: a small trainable byte-level one, or a frozen T5/UMT5 from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


def encode_bytes(captions: list[str], max_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """UTF-8 bytes + 1 as ids (0 = padding) -> ids (B, S), mask (B, S) True where a byte is."""
    rows = [list(c.encode("utf-8")[:max_len]) for c in captions]
    length = max(1, max(len(r) for r in rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long) + 1
    ids = ids.to(device)
    return ids, ids > 0


class ByteTextEncoder(nn.Module):
    """A trainable encoder for short captions: byte embeddings + a few bidirectional transformer layers.

    Enough for the embedded shapes dataset, where captions are a handful of words; no tokenizer to ship.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, max_len: int = 64):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> hidden (B, S, dim), mask (B, S)."""
        ids, mask = encode_bytes(captions, self.max_len, self.embed.weight.device)
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
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
