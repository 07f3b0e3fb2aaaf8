"""Text encoders for the video DiT: a small trainable byte-level one, or a frozen T5/UMT5 from a local folder.

The frozen one embeds prompts exactly as diffusers' WanPipeline does (`_get_t5_prompt_embeds`): the prompt
cleaned (ftfy when installed, HTML entities, whitespace), tokenized with EOS and padded to text.max_len, the
encoder run under the attention mask, and the states past each prompt's tokens set to zero; the unconditional
caption is the states of "" (WanPipeline's default negative prompt).
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import re
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "special_tokens_map.json",
                   "added_tokens.json")


def tokenizer_folder(path: str | Path) -> Path:
    """Where the encoder's tokenizer is: the folder itself, or, in a diffusers pipeline (`PIPE/text_encoder/`
    beside `PIPE/tokenizer/`), the sibling `tokenizer/`."""
    folder = Path(path)
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return folder
    sibling = folder.parent / "tokenizer"
    if sibling.is_dir():
        return sibling
    raise FileNotFoundError(f"text.encoder: no tokenizer in {folder} (tokenizer.json or spiece.model) nor in a "
                            f"sibling {sibling} (a diffusers pipeline's layout)")


def weight_files(path: str | Path) -> list[Path]:
    """The weight files transformers loads from an encoder folder: safetensors (sharded too), else .bin."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"text.encoder: no weight files (*.safetensors, pytorch_model*.bin) in {folder}")
    return files


def encoder_digest(path: str | Path) -> str:
    """A frozen encoder's identity: sha256 of its config.json settings (without `_`-prefixed bookkeeping), its
    tokenizer's files (the ids decide the states too) and its weights' bytes. Content, not names, sizes or
    mtimes, so a copied folder keeps its identity and a retrained one never shares it."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True).encode())
    tok = tokenizer_folder(folder)
    for file in [tok / n for n in TOKENIZER_FILES if (tok / n).is_file()] + weight_files(folder):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):  # 16 MiB blocks: UMT5-XXL's weights are over 10 GB
                h.update(block)
    return h.hexdigest()[:16]


@functools.cache
def _ftfy():
    """ftfy if installed (diffusers uses it then), looked up once: a failed import searches sys.path each time."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def clean_prompt(text: str) -> str:
    """WanPipeline's prompt_clean: ftfy.fix_text when ftfy is installed, HTML entities unescaped twice,
    whitespace runs collapsed and the ends stripped."""
    ftfy = _ftfy()
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def zero_padding(states: Tensor, mask: Tensor) -> Tensor:
    """States (B, S, D) with every position the mask (B, S) leaves out set to exactly zero (WanPipeline trims each
    prompt to its tokens and pads it back with zeros)."""
    return torch.where(mask.unsqueeze(-1), states, torch.zeros((), dtype=states.dtype, device=states.device))


class HFTextEncoder(nn.Module):
    """A frozen T5 / UMT5 encoder and its tokenizer, loaded from a local folder (no hub access)."""

    def __init__(self, path: str, max_len: int = 128):
        super().__init__()
        from transformers import AutoTokenizer

        config = encoder_config(path)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(path), local_files_only=True)
        self.model = encoder_class(config).from_pretrained(path, local_files_only=True)
        self.max_len = max_len
        self.hidden_size = config.d_model

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """-> states (B, max_len, D), zero past each caption's tokens (EOS included), and mask (B, max_len)."""
        tok = self.tokenizer([clean_prompt(c) for c in captions], padding="max_length", max_length=self.max_len,
                             truncation=True, add_special_tokens=True, return_attention_mask=True,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return zero_padding(states, mask.bool()), mask.bool()


def encoder_config(path: str):
    """The folder's transformers config, refused unless it is a T5 or UMT5 model (read without the weights)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"text.encoder: no config.json in {path} (a local T5/UMT5 folder)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    encoder_class(config, path)
    return config


def encoder_class(config, path: str = ""):
    from transformers import T5EncoderModel, UMT5EncoderModel

    cls = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel}.get(config.model_type)
    if cls is None:
        raise ValueError(f"text.encoder: {path} holds a '{config.model_type}' model; T5 or UMT5 expected")
    return cls


class FrozenTextEncoder(nn.Module):
    """The frozen-encoder helper, built on first use: a run whose captions all come embedded from the cache
    never loads the encoder (for UMT5-XXL, 11 GB of weights); evaluation and sampling with new prompts load it
    when they first encode. The device and dtype the trainer moves helpers to are kept by an empty buffer and
    given to the encoder when it is built."""

    def __init__(self, path: str, max_len: int):
        super().__init__()
        self.path, self.max_len = path, max_len
        self.hidden_size = encoder_config(path).d_model
        tokenizer_folder(path)  # a missing tokenizer is named now, not at the first evaluation
        self.register_buffer("placement", torch.zeros(0), persistent=False)
        self.encoder: HFTextEncoder | None = None
        self._null: tuple[Tensor, Tensor] | None = None

    def _apply(self, fn, recurse=True):
        self._null = None  # moved or cast: recompute the null caption where the encoder now is
        return super()._apply(fn, recurse)

    def load(self) -> HFTextEncoder:
        if self.encoder is None:
            if os.environ.get("RANK", "0") == "0":
                print(f"text encoder: loading {self.path} (captions to embed that no cache holds)", flush=True)
            encoder = HFTextEncoder(self.path, self.max_len)
            encoder.requires_grad_(False).eval()
            self.encoder = encoder.to(device=self.placement.device, dtype=self.placement.dtype)
        return self.encoder

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.load()(captions)

    def null(self) -> tuple[Tensor, Tensor]:
        """The unconditional caption (1, max_len, D) and mask (1, max_len): the states of "" (EOS, then zeros)."""
        if self._null is None:
            self._null = self([""])
        return self._null
