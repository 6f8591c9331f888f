"""The diffusers layout of an ADM consistency model: ``UNet2DModel`` + ``CMStochasticIterativeScheduler``.

A ``ConsistencyModelPipeline`` folder (``openai/diffusers-cd_imagenet64_l2`` and friends)::

    model_index.json                          {"_class_name": "ConsistencyModelPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                          UNet2DModel config
    unet/diffusion_pytorch_model.safetensors  its weights
    scheduler/scheduler_config.json           CMStochasticIterativeScheduler config

This module is pure torch: it maps an :class:`~cmflow.models.adm.ADMConfig` to and from a ``UNet2DModel``
config and renames (and, for attention, splits or joins) the tensors between the two state dicts, the way
diffusers' ``scripts/convert_consistency_to_diffusers.py`` converts the released checkpoints. It never
imports diffusers; the tests check the result against the real library.

Correspondence (ADM -> UNet2DModel): ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``, ``label_emb``
-> ``class_embedding``, ``input_blocks.0.0`` -> ``conv_in``; level ``i``'s residual blocks / attention /
resampler -> ``down_blocks.i.resnets.j`` / ``.attentions.j`` / ``.downsamplers.0`` (and ``up_blocks`` in
reverse level order); ``middle_block.{0,1,2}`` -> ``mid_block.resnets.0``, ``.attentions.0``,
``.resnets.1``; ``out.{0,2}`` -> ``conv_norm_out``, ``conv_out``. Inside a residual block ``in_layers.0/2``,
``emb_layers.1``, ``out_layers.0/3``, ``skip_connection`` -> ``norm1``, ``conv1``, ``time_emb_proj``,
``norm2``, ``conv2``, ``conv_shortcut``; inside attention ``norm`` -> ``group_norm``, ``proj_out`` ->
``to_out.0`` and the (3C, C, 1, 1) ``qkv`` -> ``to_q``, ``to_k``, ``to_v`` (C, C), in that order: the
(three, heads, dim) channel order of the flash-attention path the models were trained with.

The UNet is fed c_noise = 250 ln sigma by the scheduler (``sigma_to_t``), so only ADM models with
``c_noise_scale = 250`` have a diffusers form.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from cmflow.models.adm import ADMConfig

__all__ = [
    "MODEL_INDEX",
    "PIPELINE_CLASS",
    "SCHEDULER_CLASS",
    "UNET_CLASS",
    "adm_config_from_unet",
    "from_diffusers_state",
    "key_map",
    "scheduler_config",
    "to_diffusers_state",
    "unet_config",
]

PIPELINE_CLASS = "ConsistencyModelPipeline"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"
MODEL_INDEX = {
    "_class_name": PIPELINE_CLASS,
    "scheduler": ["diffusers", SCHEDULER_CLASS],
    "unet": ["diffusers", UNET_CLASS],
}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
UNET_CONFIG = "unet/config.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# UNet2DModel fields that must have these values for the network to be an ADM
_FIXED = {
    "time_embedding_type": "positional",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "add_attention": True,
    "class_embed_type": None,
}


def unet_config(cfg: ADMConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` config (``unet/config.json``) of an ADM; ``ValueError`` if it has no diffusers form."""
    if not cfg.resblock_updown:
        raise ValueError(
            "only ADMs with resblock_updown export to diffusers (UNet2DModel resnet up/down blocks)"
        )
    if cfg.channel_mult[0] != 1:
        raise ValueError(
            f"channel_mult must start with 1 for diffusers' time embedding, got {cfg.channel_mult}"
        )
    res = [cfg.img_resolution // 2**level for level in range(len(cfg.channel_mult))]
    has_attn = [r in cfg.attn_resolutions for r in res]
    return {
        "_class_name": UNET_CLASS,
        "sample_size": cfg.img_resolution,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "layers_per_block": cfg.num_res_blocks,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(has_attn)],
        "attention_head_dim": cfg.num_head_channels,
        "attn_norm_num_groups": 32,  # the mid-block attention has a GroupNorm in ADM (diffusers' default drops it)
        "num_class_embeds": cfg.num_classes or None,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "dropout": cfg.dropout,
        "time_embedding_dim": None,
        "center_input_sample": False,
        "num_train_timesteps": None,
        **_FIXED,
    }


def adm_config_from_unet(config: dict[str, Any]) -> ADMConfig:
    """Inverse of :func:`unet_config`; ``ValueError`` naming the first field with no ADM equivalent."""
    if config.get("_class_name") != UNET_CLASS:
        raise ValueError(f"unet/config.json is a {config.get('_class_name')!r}, not a {UNET_CLASS}")
    defaults = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0}
    for field, want in _FIXED.items():
        got = config.get(field, defaults.get(field, want))
        if got != want:
            raise ValueError(f"unet/config.json {field} is {got!r}; an ADM consistency model has {want!r}")
    if config.get("center_input_sample", False) or config.get("time_embedding_dim") not in (None, 0):
        raise ValueError(
            "unet/config.json sets center_input_sample or time_embedding_dim; an ADM has neither"
        )
    shift = config.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ValueError(
            f"unet/config.json resnet_time_scale_shift {shift!r} is not 'default' or 'scale_shift'"
        )
    if shift == "scale_shift" and config.get("attn_norm_num_groups") != 32:
        raise ValueError(
            "unet/config.json has no mid-block attention GroupNorm (attn_norm_num_groups is not 32)"
        )
    channels = [int(c) for c in config["block_out_channels"]]
    mult = [c // channels[0] for c in channels]
    if [m * channels[0] for m in mult] != channels:
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    kinds = {"ResnetDownsampleBlock2D": False, "AttnDownBlock2D": True}
    up_kinds = {"ResnetUpsampleBlock2D": False, "AttnUpBlock2D": True}
    if any(d not in kinds for d in down) or any(u not in up_kinds for u in up):
        raise ValueError(f"down/up block types {down} / {up} are not the ADM's resnet and attention blocks")
    if [kinds[d] for d in down] != [up_kinds[u] for u in reversed(up)]:
        raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
    resolution = int(config["sample_size"])
    attn = tuple(resolution // 2**level for level, d in enumerate(down) if kinds[d])
    return ADMConfig(
        img_resolution=resolution,
        in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)),
        model_channels=channels[0],
        channel_mult=tuple(mult),
        num_res_blocks=int(config["layers_per_block"]),
        attn_resolutions=attn,
        num_head_channels=int(config["attention_head_dim"]),
        dropout=float(config.get("dropout", 0.0)),
        num_classes=int(config.get("num_class_embeds") or 0),
        use_scale_shift_norm=shift == "scale_shift",
        resblock_updown=True,
    )


def scheduler_config(
    sigma_min: float, sigma_max: float, sigma_data: float, num_train_timesteps: int
) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a ``CMStochasticIterativeScheduler`` (rho 7, clipped outputs)."""
    return {
        "_class_name": SCHEDULER_CLASS,
        "num_train_timesteps": int(num_train_timesteps),
        "sigma_min": float(sigma_min),
        "sigma_max": float(sigma_max),
        "sigma_data": float(sigma_data),
        "s_noise": 1.0,
        "rho": 7.0,
        "clip_denoised": True,
    }


def key_map(cfg: ADMConfig) -> list[tuple[str, str, str]]:
    """(ADM module prefix, UNet2DModel module prefix, kind) pairs, kind in {"plain", "resnet", "attention"}."""
    pairs: list[tuple[str, str, str]] = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
    ]
    if cfg.num_classes:
        pairs.append(("label_emb", "class_embedding", "plain"))
    levels = len(cfg.channel_mult)
    res = [cfg.img_resolution // 2**level for level in range(levels)]
    block = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if res[level] in cfg.attn_resolutions:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            block += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", "resnet"))
            block += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    block = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = res[level] in cfg.attn_resolutions
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if attn:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
            if level and j == cfg.num_res_blocks:
                pairs.append(
                    (f"output_blocks.{block}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0", "resnet")
                )
            block += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def _params(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def to_diffusers_state(state: dict[str, Tensor], cfg: ADMConfig) -> dict[str, Tensor]:
    """An ADM backbone state dict (``cm/unet.py`` keys) as a ``UNet2DModel`` state dict."""
    out: dict[str, Tensor] = {}
    for old, new, kind in key_map(cfg):
        params = _params(state, old)
        if kind == "attention":
            for suffix in ("weight", "bias"):
                q, k, v = params[f"qkv.{suffix}"].chunk(3, dim=0)  # (three, heads, dim) channel order
                for name, t in (("to_q", q), ("to_k", k), ("to_v", v)):
                    out[f"{new}.{name}.{suffix}"] = t.reshape(t.shape[0], -1) if suffix == "weight" else t
                out[f"{new}.group_norm.{suffix}"] = params[f"norm.{suffix}"]
                w = params[f"proj_out.{suffix}"]
                out[f"{new}.to_out.0.{suffix}"] = w.reshape(w.shape[0], -1) if suffix == "weight" else w
            continue
        for rest, value in params.items():
            if kind == "resnet":
                module, suffix = rest.rsplit(".", 1)
                rest = f"{_RESNET[module]}.{suffix}"
            out[f"{new}.{rest}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers_state(state: dict[str, Tensor], cfg: ADMConfig) -> dict[str, Tensor]:
    """A ``UNet2DModel`` state dict as ADM backbone keys (inverse of :func:`to_diffusers_state`).

    ``KeyError`` names the first UNet2DModel tensor the mapping needs that ``state`` lacks.
    """
    out: dict[str, Tensor] = {}
    for old, new, kind in key_map(cfg):
        params = _params(state, new)
        if kind == "attention":
            for suffix in ("weight", "bias"):
                parts = [_need(params, f"{n}.{suffix}", new) for n in ("to_q", "to_k", "to_v")]
                if suffix == "weight":
                    parts = [p[:, :, None, None] for p in parts]
                out[f"{old}.qkv.{suffix}"] = _cat(parts)
                out[f"{old}.norm.{suffix}"] = _need(params, f"group_norm.{suffix}", new)
                w = _need(params, f"to_out.0.{suffix}", new)
                out[f"{old}.proj_out.{suffix}"] = w[:, :, None, None] if suffix == "weight" else w
            continue
        inverse = {v: k for k, v in _RESNET.items()}
        for rest, value in params.items():
            if kind == "resnet":
                module, suffix = rest.rsplit(".", 1)
                if module not in inverse:
                    raise KeyError(f"{new}.{rest}")
                rest = f"{inverse[module]}.{suffix}"
            out[f"{old}.{rest}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def _need(params: dict[str, Tensor], name: str, prefix: str) -> Tensor:
    if name not in params:
        raise KeyError(f"{prefix}.{name}")
    return params[name]


def _cat(parts: list[Tensor]) -> Tensor:
    import torch

    return torch.cat(parts, dim=0)
