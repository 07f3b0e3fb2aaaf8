"""Causal 3D convolution whose past-frame padding can come from the previous chunk (a feature cache).

Time is padded on the past side only, so output frame t sees input frames <= t. The padding of the very
first chunk is zeros (as in Wan2.1's VAE); later chunks take it from the frames the previous chunk left
unconsumed, so running a video chunk by chunk gives the same output as running it whole.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CausalConv3d(nn.Conv3d):
    """Conv3d padded with (kernel_t - 1) past frames in time and symmetric zeros in space."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        kt, kh, kw = kernel
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"spatial kernel={kernel[1:]} must be odd for symmetric padding")
        super().__init__(in_ch, out_ch, kernel, stride, padding=(0, kh // 2, kw // 2))
        self.time_pad = kt - 1

    def forward(self, x: Tensor, cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x: (B, C, T, H, W); cache: (B, C, Tc, H, W) or None at the video start -> (y, new_cache).

        y: (B, out_ch, T_out, H', W') has one frame per kernel window that fits in cache + x. new_cache
        holds the frames from the next window start on: the last (kernel_t - 1) frames for stride 1,
        kernel_t - stride_t frames for a strided conv fed chunks that are multiples of its stride. Its
        size does not grow with the number of chunks.
        """
        if cache is None:
            b, c, _, h, w = x.shape
            cache = x.new_zeros(b, c, self.time_pad, h, w)
        padded = torch.cat([cache, x], dim=2)
        kt, st = self.kernel_size[0], self.stride[0]
        n_out = max(0, (padded.shape[2] - kt) // st + 1)
        # clone so the cache does not pin the whole chunk's storage in memory
        new_cache = padded[:, :, n_out * st :].clone()
        if n_out == 0:
            b, _, _, h, w = padded.shape
            sh, sw = self.stride[1:]
            empty = padded.new_zeros(b, self.out_channels, 0, (h - 1) // sh + 1, (w - 1) // sw + 1)
            return empty, new_cache
        return super().forward(padded), new_cache


class FeatureCache:
    """The unconsumed tail frames of every CausalConv3d, carried from one chunk of a video to the next.

    Use one instance per video (per encode or decode call) and route every causal conv through it; a
    whole video is just a single chunk with a fresh cache.
    """

    def __init__(self) -> None:
        self._tails: dict[int, Tensor] = {}

    def started(self, conv: CausalConv3d) -> bool:
        """Whether conv has already seen a chunk of this video (False on the first chunk)."""
        return id(conv) in self._tails

    def __call__(self, conv: CausalConv3d, x: Tensor) -> Tensor:
        """Run conv on the chunk x: (B, C, T, H, W), continuing from its cached past frames."""
        y, self._tails[id(conv)] = conv(x, self._tails.get(id(conv)))
        return y

    def numel(self) -> int:
        """Total elements held; constant from chunk to chunk once every conv has seen one."""
        return sum(t.numel() for t in self._tails.values())
