"""``prepare_data``: read a dataset from its source and write it as uint8 arrays with a content digest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cmflow.stage import Artifact, ParamsModel, StageContext, stage


class PrepareDataParams(ParamsModel):
    source: Literal["sklearn-digits", "cifar10", "image-folder", "npz"] = Field(
        "sklearn-digits", description="Where the images come from."
    )
    uri: str | None = Field(
        None, description="Dataset URI (path, file://, s3://): the CIFAR-10 tarball, image folder or .npz."
    )
    resolution: int | None = Field(None, ge=4, le=1024, description="Resize (centre-crop + Lanczos) to RxR.")
    hflip: bool = Field(False, description="Append a horizontally mirrored copy of every image.")
    use_labels: bool = Field(True, description="Keep class labels (labels.npy) when the source has them.")
    max_images: int | None = Field(None, ge=1, description="Keep only the first N images (before flips).")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `uri` (default: the AWS_* environment)."
    )

    @model_validator(mode="after")
    def _uri_needed(self) -> PrepareDataParams:
        if self.source != "sklearn-digits" and not self.uri:
            raise ValueError(f"source {self.source!r} needs a uri (the dataset's path or s3:// URI)")
        return self


@stage(
    "prepare_data",
    params=PrepareDataParams,
    version="1",
)
def prepare_data(params: PrepareDataParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Write ``images.npy`` (uint8 N,C,H,W; shards ``images-00000.npy``... if large), ``labels.npy`` and
    ``dataset.json`` (source, num_images, channels, resolution, num_classes, digest).

    Examples:
        data: {kind: prepare_data, params: {source: sklearn-digits}}
        data: {kind: prepare_data, params: {source: cifar10, uri: s3://datasets/cifar-10-python.tar.gz}}
    """
    from cmflow.data.images import resize_images, with_hflips
    from cmflow.data.shards import dataset_meta, write_dataset
    from cmflow.data.sources import read_source

    ctx.progress(0, 3, message=f"reading {params.source}")
    raw = read_source(params.source, params.uri, params.storage_options, params.resolution)
    images, labels = raw.images, (raw.labels if params.use_labels else None)
    if params.max_images is not None:
        images = images[: params.max_images]
        labels = labels[: params.max_images] if labels is not None else None
    ctx.progress(1, 3, message=f"{images.shape[0]} images")
    if params.resolution is not None and images.shape[2:] != (params.resolution, params.resolution):
        images = resize_images(images, params.resolution)
    if params.hflip:
        images, labels = with_hflips(images, labels)
    num_classes = raw.num_classes if labels is not None else 0
    extra = {"class_names": raw.class_names} if labels is not None and raw.class_names else {}
    info = write_dataset(
        ctx.out_dir, images, labels, source=params.source, num_classes=num_classes, extra=extra
    )
    ctx.progress(3, 3, message=f"{info['num_images']} images written")
    return dataset_meta(info)
