"""The ADM UNet backbone of openai/consistency_models (``cm/unet.py`` ``UNetModel``), with its checkpoint layout.

This is the network of the released ImageNet-64 and LSUN-256 EDM teachers and consistency models
(``edm_imagenet64_ema.pt``, ``cd_imagenet64_l2.pt``, ``ct_bedroom256.pt``, ...; Dhariwal & Nichol 2021's
ADM as used by Song et al. 2023). Like :class:`cmflow.models.unet.UNet` it is a plain backbone
``F(x, noise_labels, class_labels)``; the wrappers of :mod:`cmflow.models.precond` add the EDM / CM
scalings, and with ``c_noise_scale = 250`` they feed it c_noise = 250 ln sigma, the timestep those
checkpoints were trained with (openai ``KarrasDenoiser.denoise``: ``1000 * 0.25 * log(sigma + 1e-44)``).

Layout (one level per entry of ``channel_mult``; ``num_res_blocks`` residual blocks per level; attention
after every residual block of a level whose resolution is in ``attn_resolutions``)::

    input_blocks:  conv | [ResBlock (+Attn)] x num_res_blocks, Down | ... | [ResBlock (+Attn)] x num_res_blocks
    middle_block:  ResBlock, Attn, ResBlock
    output_blocks: [concat skip, ResBlock (+Attn)] x (num_res_blocks + 1), the last one + Up | ...
    out:           GroupNorm, SiLU, conv

The state-dict keys are exactly the released files' keys (``time_embed.0.weight``, ``label_emb.weight``,
``input_blocks.0.0.weight``, ``input_blocks.1.0.in_layers.0.weight``, ``middle_block.1.qkv.weight``,
``output_blocks.3.2.out_layers.3.weight``, ``out.2.weight``, ...), so a released ``.pt`` state dict loads
with ``strict=True`` and nothing renamed.

Attention: the 1x1 ``qkv`` convolution's 3C output channels are ordered (three, heads, head_dim), i.e. all
queries, then all keys, then all values. That is the order of ``QKVFlashAttention`` (einops
``"b (three h d) s"``), the path the released models were trained with; the older ``QKVAttentionLegacy``
of guided-diffusion split (heads, three, head_dim) and gives wrong images with these weights
(openai/consistency_models#25, fixed in PR #37). Scores are scaled by 1 / sqrt(head_dim).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ADM", "ADM_PRESETS", "ADMConfig", "make_adm"]

GROUPS = 32  # ADM's normalization(): GroupNorm(32, C), evaluated in float32


@dataclass(frozen=True)
class ADMConfig:
    """Hyperparameters of :class:`ADM`, named as ``cm/script_util.py`` flags where they have one."""

    img_resolution: int  # --image_size
    in_channels: int = 3
    out_channels: int = 3  # 6 with learn_sigma (not used by the CM checkpoints)
    model_channels: int = 192  # --num_channels
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3  # --num_res_blocks
    attn_resolutions: tuple[int, ...] = (32, 16, 8)  # --attention_resolutions, in pixels
    num_head_channels: int = 64  # --num_head_channels: heads = channels // 64
    dropout: float = 0.0  # --dropout
    num_classes: int = 0  # 1000 with --class_cond True; 0 = unconditional
    use_scale_shift_norm: bool = True  # --use_scale_shift_norm (FiLM: GroupNorm(h) (1 + scale) + shift)
    resblock_updown: bool = True  # --resblock_updown: residual blocks resample; else (strided) convolutions

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if not levels or self.num_res_blocks < 1 or self.num_classes < 0:
            raise ValueError("channel_mult must be non-empty, num_res_blocks >= 1 and num_classes >= 0")
        if self.img_resolution % (2 ** (levels - 1)):
            raise ValueError(
                f"img_resolution {self.img_resolution} is not divisible by 2**{levels - 1} "
                f"(channel_mult {self.channel_mult} has {levels} levels)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        for mult in self.channel_mult:
            width = self.model_channels * mult
            if width % GROUPS:
                raise ValueError(f"{width} channels cannot form {GROUPS} GroupNorm groups")
            if width % self.num_head_channels:
                raise ValueError(
                    f"{width} channels are not a multiple of num_head_channels {self.num_head_channels}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ADMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ADMConfig keys: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --------------------------------------------------------------------------------------------------------
# Building blocks (attribute names are the checkpoint's)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 whatever the input dtype (ADM ``normalization``)."""

    def __init__(self, channels: int) -> None:
        super().__init__(GROUPS, channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """ADM's sinusoidal embedding [cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim/2)); (B,) -> (B, dim).

    (Not EDM's ``endpoint=True`` variant of :mod:`cmflow.models.unet`: the last frequency is
    max_period^(-(half-1)/half).)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """ADM residual block: in_layers (norm, SiLU, conv), the embedding projection, out_layers (norm, SiLU,
    dropout, zero-initialised conv), a skip path; optionally resamples both paths by 2 (``up`` / ``down``)."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_ch: int, cfg: ADMConfig, *, up: bool = False, down: bool = False
    ) -> None:
        super().__init__()
        self.resample = "up" if up else "down" if down else None
        self.use_scale_shift_norm = cfg.use_scale_shift_norm
        self.in_layers = nn.Sequential(GroupNorm32(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if cfg.use_scale_shift_norm else out_ch)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_ch),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
            _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))  # resampling sits between the activation and the conv
        x = self._resample(x)
        params = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, out or 2 out, 1, 1)
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = params.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_rest(out_norm(h + params))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels with ``channels // num_head_channels`` heads; qkv as (three, heads, dim)."""

    def __init__(self, channels: int, num_head_channels: int) -> None:
        super().__init__()
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each (B, heads, HW, dim)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim)) v: (B, heads, HW, dim)
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # channels as (heads, dim)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (ADM ``Downsample(use_conv=True)``; key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 convolution (ADM ``Upsample(use_conv=True)``; key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order; residual blocks
    also get the embedding (ADM ``TimestepEmbedSequential``, whose children are named ``0``, ``1``, ...)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# --------------------------------------------------------------------------------------------------------
# The network


class ADM(nn.Module):
    """ADM UNet backbone ``F(x, noise_labels, class_labels)`` (openai/consistency_models ``UNetModel``).

    ``forward(x, noise_labels, class_labels=None)``: ``x`` (B, in_channels, R, R); ``noise_labels`` (B,) the
    wrapper's c_noise (250 ln sigma for the released checkpoints); ``class_labels`` (B,) int64 in
    [0, num_classes): required by a class-conditional model and refused by an unconditional one (as the
    reference asserts). Returns (B, out_channels, R, R).
    """

    def __init__(self, config: ADMConfig) -> None:
        super().__init__()
        cfg = self.config = config
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        def attn(channels: int, res: int) -> list[nn.Module]:
            return [AttentionBlock(channels, cfg.num_head_channels)] if res in cfg.attn_resolutions else []

        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([Block([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skip_chs, res = [ch], cfg.img_resolution
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(Block([ResBlock(ch, mc * mult, emb_ch, cfg), *attn(mc * mult, res)]))
                ch = mc * mult
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = ResBlock(ch, ch, emb_ch, cfg, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(Block([down]))
                skip_chs.append(ch)
                res //= 2

        self.middle_block = Block(
            [
                ResBlock(ch, ch, emb_ch, cfg),
                AttentionBlock(ch, cfg.num_head_channels),
                ResBlock(ch, ch, emb_ch, cfg),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chs.pop(), mc * mult, emb_ch, cfg), *attn(mc * mult, res)]
                ch = mc * mult
                if level and i == cfg.num_res_blocks:
                    layers.append(
                        ResBlock(ch, ch, emb_ch, cfg, up=True) if cfg.resblock_updown else Upsample(ch)
                    )
                    res *= 2
                self.output_blocks.append(Block(layers))
        assert not skip_chs and res == cfg.img_resolution

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        cfg = self.config
        if cfg.num_classes and class_labels is None:
            raise ValueError(f"this ADM is class-conditional ({cfg.num_classes} classes): pass class_labels")
        if not cfg.num_classes and class_labels is not None:
            raise ValueError("this ADM is unconditional: leave class_labels out")
        noise_labels = noise_labels.reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(noise_labels, cfg.model_channels))  # (B, 4 mc)
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels.reshape(-1).to(torch.long))
        h = x.to(self.time_embed[0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.to(x.dtype))


# --------------------------------------------------------------------------------------------------------
# Presets: the released models' flags (scripts/launch.sh, cm/script_util.py)

ADM_PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet-64, class-conditional: --num_channels 192 --num_res_blocks 3 --attention_resolutions 32,16,8
    # --num_head_channels 64 --use_scale_shift_norm True --resblock_updown True --class_cond True, channel_mult
    # (1,2,3,4) (script_util's default at 64 px). Dropout: 0.1 for the EDM teacher (edm_train, --dropout 0.1),
    # 0.0 for the CD/CT students; override ``dropout`` for a teacher that is trained further.
    "adm-imagenet64": dict(
        img_resolution=64,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        num_head_channels=64,
        num_classes=1000,
        use_scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
    ),
    # LSUN Bedroom / Cat 256, unconditional: --num_channels 256 --num_res_blocks 2 --attention_resolutions
    # 32,16,8 --num_head_channels 64 --use_scale_shift_norm False --resblock_updown True --class_cond False,
    # channel_mult (1,1,2,2,4,4) (script_util's default at 256 px).
    "adm-lsun256": dict(
        img_resolution=256,
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(32, 16, 8),
        num_head_channels=64,
        num_classes=0,
        use_scale_shift_norm=False,
        resblock_updown=True,
        dropout=0.0,
    ),
}


def make_adm(preset: str, **overrides: Any) -> ADM:
    """An :class:`ADM` from ``ADM_PRESETS[preset]`` with any field overridden."""
    if preset not in ADM_PRESETS:
        raise ValueError(f"unknown ADM preset {preset!r}; choose from {sorted(ADM_PRESETS)}")
    return ADM(ADMConfig(**{**ADM_PRESETS[preset], **overrides}))
