"""``perceptual_net``: train a small LPIPS-style network for ``distance: feature`` (or ``lpips``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cmflow.stage import Artifact, ParamsModel, StageContext, stage


class PerceptualNetParams(ParamsModel):
    steps: int = Field(300, ge=1, description="Classifier training steps.")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    widths: list[int] = Field(default_factory=lambda: [32, 64], description="Channels of the conv stages.")
    seed: int = Field(17, ge=0, description="Combined with the pipeline seed.")


@stage(
    "perceptual_net",
    params=PerceptualNetParams,
    version="1",
    inputs=("data",),
)
def perceptual_net(
    params: PerceptualNetParams, inputs: dict[str, Artifact], ctx: StageContext
) -> dict[str, Any]:
    """Train a small LPIPS-style network for ``distance: feature`` (or ``lpips``) as a classifier on the
    labelled ``data``; writes ``perceptual.json`` + ``perceptual.safetensors``.

    This network is trained here, from its own seed, with its own architecture (conv/ReLU stages with
    average pooling); it is not the FID feature network of :mod:`cmflow.metrics`, so distilling with it does
    not optimise the evaluation metric directly.

    Examples:
        perceptual: {kind: perceptual_net, inputs: {data: data}}
        distill: {kind: distill, inputs: {teacher: teacher, data: data, perceptual: perceptual},
                  params: {distance: feature}}
    """
    import json

    import torch
    from safetensors.torch import save as st_save

    from cmflow.data.shards import read_dataset
    from cmflow.diffusion.rng import mix_seed
    from cmflow.errors import InputError
    from cmflow.training.perceptual import CONFIG, WEIGHTS, train_classifier_features

    torch.set_num_threads(ctx.num_threads)
    images, labels, info = read_dataset(inputs["data"].read_bytes)
    if labels is None or info.get("num_classes", 0) < 2:
        raise InputError(
            f"stage {ctx.stage!r}: the perceptual network is trained as a classifier and needs labels; set "
            "use_labels: true in prepare_data"
        )
    ctx.progress(0, params.steps, message="training the perceptual network")
    net, accuracy = train_classifier_features(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        int(info["num_classes"]),
        steps=params.steps,
        batch_size=params.batch_size,
        lr=params.lr,
        seed=mix_seed(params.seed, ctx.seed),
        widths=tuple(params.widths),
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    (ctx.out_dir / WEIGHTS).write_bytes(st_save(state))
    (ctx.out_dir / CONFIG).write_text(json.dumps(net.config, indent=1, sort_keys=True))
    ctx.progress(params.steps, params.steps, message=f"train accuracy {accuracy:.3f}")
    return {"train_accuracy": round(accuracy, 4), "params_count": sum(p.numel() for p in net.parameters())}
