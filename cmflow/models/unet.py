"""UNet backbone in the DDPM++ / ADM family (EDM's ``SongUNet`` and ``DhariwalUNet`` are the model).

The backbone is a plain ``nn.Module`` ``F(x, noise_labels, class_labels)``: it knows nothing of sigma,
c_skip or c_out. The preconditioning wrappers in :mod:`cmflow.models.precond` turn it into the EDM denoiser
D(x; sigma) (EDM Table 1) or the consistency function f(x, t) (CM Eq. (5), App. C).

Layout (one encoder/decoder level per entry of ``channel_mult``; resolution halves between levels)::

    conv_in -> [ResBlock (+Attn)] x num_blocks, Down -> ... -> mid: ResBlock, Attn, ResBlock
            -> [concat skip, ResBlock (+Attn)] x (num_blocks + 1), Up -> ... -> GroupNorm, SiLU, conv_out

Noise conditioning: ``noise_labels`` (the wrapper's c_noise, e.g. 1/4 ln sigma) pass through a positional
(transformer-style, EDM ``PositionalEmbedding``) or random Fourier (NCSN++, EDM ``FourierEmbedding``)
embedding, a class embedding is added, then a 2-layer MLP gives ``emb``, which every residual block
consumes as an additive bias (DDPM++) or as an adaptive GroupNorm scale/shift (ADM ``use_scale_shift_norm``).
The last convolution of each residual block, each attention projection and the output layer are
zero-initialised (ADM ``zero_module``), so a freshly built UNet outputs exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNET_PRESETS", "UNet", "UNetConfig", "make_unet"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture hyperparameters of :class:`UNet`; JSON-safe through :meth:`to_dict` /
    :meth:`from_dict`."""

    img_resolution: int  # H = W of the input, e.g. 8, 32, 64
    in_channels: int  # C of the input x
    out_channels: int  # C of the output (normally == in_channels)
    model_channels: int = 64  # base channel count
    channel_mult: tuple[int, ...] = (1, 2)  # channels per level = model_channels * mult; one level per entry
    num_blocks: int = 2  # residual blocks per encoder level (decoder uses num_blocks + 1)
    attn_resolutions: tuple[int, ...] = ()  # resolutions (in pixels) at which self-attention is applied
    dropout: float = 0.0  # dropout probability inside residual blocks
    num_classes: int = 0  # 0 = unconditional; otherwise class labels in [0, num_classes)
    embedding_type: Literal["positional", "fourier"] = "positional"
    channel_mult_emb: int = 4  # embedding width = model_channels * channel_mult_emb
    channel_mult_noise: int = 1  # noise-embedding width = model_channels * channel_mult_noise
    channels_per_head: int = 64  # attention heads = max(1, channels // channels_per_head) (ADM: 64)
    mid_attention: bool = True  # self-attention in the middle block (ADM and DDPM++ both have it)
    adaptive_scale: bool = True  # ADM scale-shift norm (True) or DDPM++ additive embedding (False)
    fourier_scale: float = 16.0  # std of the random Fourier frequencies (NCSN++: 16; iCT lowers it)
    max_positions: int = 10000  # positional embedding period range (EDM / transformer default)

    def __post_init__(self) -> None:
        if self.embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
        if self.img_resolution % (2 ** (len(self.channel_mult) - 1)) != 0:
            raise ValueError(
                f"img_resolution {self.img_resolution} is not divisible by 2**{len(self.channel_mult) - 1} "
                f"(channel_mult {self.channel_mult} has {len(self.channel_mult)} levels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.num_classes < 0 or self.num_blocks < 1 or not self.channel_mult:
            raise ValueError("num_classes must be >= 0, num_blocks >= 1 and channel_mult non-empty")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {unknown}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


# --------------------------------------------------------------------------------------------------------
# Building blocks


def _num_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Largest group count <= min(32, C/4) that divides C (EDM ``GroupNorm`` rule, made divisible)."""
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-5)


def _zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of a scalar (EDM ``PositionalEmbedding``, ``endpoint=True``)."""

    def __init__(self, num_channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError("positional embedding needs an even channel count >= 4")
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, x: Tensor) -> Tensor:  # (B,) -> (B, C)
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1)
        freqs = (1.0 / self.max_positions) ** freqs
        arg = x.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++ / EDM ``FourierEmbedding``); frequencies ~ N(0,
    scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError("Fourier embedding needs an even channel count")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:  # (B,) -> (B, C)
        arg = x.to(torch.float32)[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """Pre-activation residual block with embedding conditioning (DDPM++ / ADM), output scaled by
    1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, adaptive_scale: bool) -> None:
        super().__init__()
        self.adaptive_scale = adaptive_scale
        self.norm0 = _group_norm(in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.affine = nn.Linear(emb_ch, out_ch * (2 if adaptive_scale else 1))
        self.norm1 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))  # (B, out, H, W)
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        return (h + self.skip(x)) * (1 / math.sqrt(2))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels; q/k/v split as "(three heads dim)" (cf. CM issue #25 / PR
    #37)."""

    def __init__(self, channels: int, channels_per_head: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // channels_per_head)
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} heads")
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each (B, heads, HW, dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, dim)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * (1 / math.sqrt(2))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (ADM ``conv_resample=True``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution (ADM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """ResBlock followed by optional attention; one unit of the encoder/decoder."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, emb_ch: int, use_attn: bool) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, cfg.dropout, cfg.adaptive_scale)
        self.attn = AttentionBlock(out_ch, cfg.channels_per_head) if use_attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


# --------------------------------------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """DDPM++ / ADM-style UNet backbone ``F(x, noise_labels, class_labels)``.

    Args:
        config: the architecture (:class:`UNetConfig`).

    ``forward(x, noise_labels, class_labels=None)``: ``x`` is (B, in_channels, R, R); ``noise_labels`` is (B,)
    float (whatever c_noise the wrapper chooses); ``class_labels`` is (B,) int64 in [0, num_classes) and is
    required when ``num_classes > 0`` and ignored otherwise (as EDM's preconditioners do). Returns
    (B, out_channels, R, R).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        cfg = self.config = config
        emb_ch = cfg.model_channels * cfg.channel_mult_emb
        noise_ch = cfg.model_channels * cfg.channel_mult_noise

        # Noise / class embedding.
        if cfg.embedding_type == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(noise_ch, cfg.max_positions)
        else:
            self.map_noise = FourierEmbedding(noise_ch, cfg.fourier_scale)
        self.map_label = nn.Embedding(cfg.num_classes, noise_ch) if cfg.num_classes > 0 else None
        self.map_layer0 = nn.Linear(noise_ch, emb_ch)
        self.map_layer1 = nn.Linear(emb_ch, emb_ch)

        # Encoder.
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skip_chs = [cfg.model_channels]
        ch, res = cfg.model_channels, cfg.img_resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_blocks):
                out = cfg.model_channels * mult
                self.enc.append(_Level(ch, out, cfg, emb_ch, res in cfg.attn_resolutions))
                ch = out
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.enc.append(Downsample(ch))
                res //= 2
                skip_chs.append(ch)

        # Middle.
        self.mid0 = ResBlock(ch, ch, emb_ch, cfg.dropout, cfg.adaptive_scale)
        self.mid_attn = AttentionBlock(ch, cfg.channels_per_head) if cfg.mid_attention else None
        self.mid1 = ResBlock(ch, ch, emb_ch, cfg.dropout, cfg.adaptive_scale)

        # Decoder.
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                out = cfg.model_channels * mult
                self.dec.append(_Level(ch + skip_chs.pop(), out, cfg, emb_ch, res in cfg.attn_resolutions))
                ch = out
            if level != 0:
                self.dec.append(Upsample(ch))
                res *= 2
        assert not skip_chs and res == cfg.img_resolution

        self.out_norm = _group_norm(ch)
        self.conv_out = _zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        cfg = self.config
        noise_labels = noise_labels.reshape(-1).expand(x.shape[0])
        emb = self.map_noise(noise_labels)  # (B, noise_ch)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(
                    f"this UNet is class-conditional ({cfg.num_classes} classes): pass class_labels"
                )
            emb = emb + self.map_label(class_labels.reshape(-1).to(torch.long))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb.to(self.map_layer0.weight.dtype)))))
        emb = emb.to(x.dtype)

        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
            skips.append(h)
        h = self.mid0(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid1(h, emb)
        for block in self.dec:
            if isinstance(block, _Level):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.out_norm(h)))


# --------------------------------------------------------------------------------------------------------
# Presets

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Tests: ~41 K parameters, a batch of 16 at 8x8 in a few milliseconds.
    "tiny": dict(
        model_channels=8,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(),
        channel_mult_emb=2,
        channels_per_head=16,
        mid_attention=True,
    ),
    # 8x8 digits on 2 CPU cores: 8x8 -> 4x4 -> 8x8, attention at 4x4, 1.08 M parameters,
    # ~85 ms per training step at batch 128 (forward + backward + Adam, 2 threads).
    "digits": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_blocks=2,
        attn_resolutions=(4,),
        channel_mult_emb=4,
        channels_per_head=32,
    ),
    # CIFAR-10, NCSN++/DDPM++ scale (CM configs/cifar10_ve_cd.py): nf 128, ch_mult (2,2,2), 4 res blocks,
    # attention at 16, Fourier embedding (scale 16), single-head attention, additive embedding; dropout 0.0
    # for the CD student (the EDM teacher used 0.13; override per stage).
    "cifar10": dict(
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.0,
        embedding_type="fourier",
        fourier_scale=16.0,
        channel_mult_emb=4,
        channels_per_head=256,
        adaptive_scale=False,
    ),
    # ImageNet-64, ADM (CM launch.sh + cm/script_util.py): 192 ch, mult (1,2,3,4), 3 res blocks, attention at
    # 32/16/8 with 64-channel heads, scale-shift norm, 1000 classes; dropout 0.0 (student; teacher used 0.1).
    "imagenet64": dict(
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.0,
        num_classes=1000,
        embedding_type="positional",
        channel_mult_emb=4,
        channels_per_head=64,
        adaptive_scale=True,
    ),
}


def make_unet(
    preset: str,
    img_resolution: int,
    in_channels: int,
    num_classes: int | None = None,
    **overrides: Any,
) -> UNet:
    """Build a :class:`UNet` from ``UNET_PRESETS[preset]``; ``out_channels = in_channels``.

    ``num_classes=None`` keeps the preset's value (1000 for ``"imagenet64"``, 0 otherwise); any other keyword
    overrides the preset field of the same name.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(UNET_PRESETS)}")
    kw: dict[str, Any] = dict(UNET_PRESETS[preset])
    if num_classes is not None:
        kw["num_classes"] = num_classes
    kw.update(overrides)
    kw.setdefault("out_channels", in_channels)
    return UNet(UNetConfig(img_resolution=img_resolution, in_channels=in_channels, **kw))
