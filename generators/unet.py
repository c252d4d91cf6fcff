"""A small class-conditional UNet that predicts the noise in x_t.

Sized for CPU training: GroupNorm residual blocks, optional self-attention at
chosen resolutions, sinusoidal timestep embedding. Class index `num_classes`
is the "no class" token used for label dropout and classifier-free guidance.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.1
    num_classes: int = 10  # 0 means unconditional

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        for key in ("channel_mults", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(16, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attn = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(attn.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(config.num_classes + 1, emb_dim) if config.num_classes else None
        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        res = config.image_size
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                out = config.base_channels * mult
                self.down.append(self._block(ch, out, emb_dim, res))
                ch = out
                skip_channels.append(ch)
            if level != len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, config.dropout), SelfAttention(ch),
                                  ResBlock(ch, ch, emb_dim, config.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                out = config.base_channels * mult
                self.up.append(self._block(ch + skip_channels.pop(), out, emb_dim, res))
                ch = out
            if level != 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2

        self.head = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def _block(self, in_ch: int, out_ch: int, emb_dim: int, res: int) -> nn.Module:
        block = ResBlock(in_ch, out_ch, emb_dim, self.config.dropout)
        if res in self.config.attention_resolutions:
            return nn.ModuleList([block, SelfAttention(out_ch)])
        return nn.ModuleList([block])

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_class, device=x.device, dtype=torch.long)
            emb = emb + self.class_emb(labels)

        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run_layer(layer, h, emb)
        return self.head(h)

    @staticmethod
    def _run_layer(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.ModuleList):
            h = layer[0](h, emb)
            for extra in layer[1:]:
                h = extra(h)
            return h
        return layer(h)
