"""``prepare_data``: decode a dataset in parallel with Ray Data and write it as fixed-size uint8 shards."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, model_validator

from cmflow.stage import Artifact, ParamsModel, StageContext, stage

#: items per decode task: enough work to amortise a task, small enough to spread over the CPUs
CHUNK_ITEMS = 512
SHUFFLE_SEED = 0


class PrepareDataParams(ParamsModel):
    source: Literal["sklearn-digits", "cifar10", "image-folder", "npz"] = Field(
        "sklearn-digits", description="Where the images come from."
    )
    uri: str | None = Field(
        None, description="Dataset URI (path, file://, s3://): the CIFAR-10 tarball, image folder or .npz."
    )
    resolution: int | None = Field(None, ge=4, le=1024, description="Resize (centre-crop + Lanczos) to RxR.")
    hflip: bool = Field(False, description="Add a horizontally mirrored copy of every image.")
    use_labels: bool = Field(True, description="Keep class labels when the source has them.")
    max_images: int | None = Field(None, ge=1, description="Keep only the first N images (before flips).")
    shuffle: bool = Field(
        True,
        description="Write the images in a seeded random order, so every shard is a random sample of the "
        "dataset (what streaming training needs); false keeps the source order.",
    )
    shard_images: int | None = Field(
        None, ge=1, description="Images per shard (default: about 64 MiB of pixels per shard)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `uri` (default: the AWS_* environment)."
    )

    @model_validator(mode="after")
    def _uri_needed(self) -> PrepareDataParams:
        if self.source != "sklearn-digits" and not self.uri:
            raise ValueError(f"source {self.source!r} needs a uri (the dataset's path or s3:// URI)")
        return self


class _DecodeChunk:
    """Ray Data map function: one chunk row -> its images (flipped where asked) and labels.

    A source's in-memory arrays (a CIFAR tarball's, an npz's) travel once through Ray's object store:
    every task maps them instead of receiving a copy.
    """

    def __init__(self, source: Any) -> None:
        import ray

        from cmflow.data.sources import ArraySource

        if isinstance(source, ArraySource) and ray.is_initialized():
            refs = {"images": ray.put(source.images)}
            if source.labels is not None:
                refs["labels"] = ray.put(source.labels)
            source = replace(source, **refs)
        self.source = source

    def _resolved(self) -> Any:
        import ray

        from cmflow.data.sources import ArraySource

        source = self.source
        if isinstance(source, ArraySource) and isinstance(source.images, ray.ObjectRef):
            labels = ray.get(source.labels) if isinstance(source.labels, ray.ObjectRef) else source.labels
            source = replace(source, images=ray.get(source.images), labels=labels)
        return source

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        row = {key: values[0] for key, values in batch.items()}
        images, labels = self._resolved().decode(row)
        flip = np.frombuffer(row["flip"], dtype=np.bool_)
        images = np.where(flip[:, None, None, None], images[..., ::-1], images)
        out = {"images": np.ascontiguousarray(images)}
        if labels is not None:
            out["labels"] = labels
        return out


def _chunks(params: PrepareDataParams, num_items: int) -> list[tuple[Any, Any]]:
    """(item indices, flip flags) per decode chunk, in the order the shards hold them."""
    import numpy as np

    count = min(num_items, params.max_images or num_items)
    index = np.arange(count, dtype=np.int64)
    flip = np.zeros(count, dtype=np.bool_)
    if params.hflip:
        index, flip = np.concatenate([index, index]), np.concatenate([flip, ~flip])
    if params.shuffle:
        order = np.random.default_rng(SHUFFLE_SEED).permutation(index.shape[0])
        index, flip = index[order], flip[order]
    return [
        (index[a : a + CHUNK_ITEMS], flip[a : a + CHUNK_ITEMS]) for a in range(0, index.shape[0], CHUNK_ITEMS)
    ]


def _decoded(source: Any, chunks: list[tuple[Any, Any]], ctx: StageContext) -> Iterator[tuple[Any, Any]]:
    """Decoded chunks in order: Ray Data tasks with the stage's per-task CPUs when Ray runs, else here."""
    import ray

    decode = _DecodeChunk(source.for_tasks())
    rows = [{**source.chunk(index), "flip": flip.tobytes()} for index, flip in chunks]
    if not ray.is_initialized():
        for row in rows:
            out = decode({key: [value] for key, value in row.items()})
            yield out["images"], out.get("labels")
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        decode, batch_size=1, num_cpus=max(ctx.resources.cpus, 0.25), zero_copy_batch=True
    )
    try:
        for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield block["images"], block.get("labels")
    except Exception as exc:  # noqa: BLE001 - Ray Data wraps the decode task's own error
        from cmflow.distributed.errors import unwrap

        raise unwrap(exc) from None


@stage("prepare_data", params=PrepareDataParams, version="2", distributed=True)
def prepare_data(params: PrepareDataParams, inputs: dict[str, Artifact], ctx: StageContext) -> dict[str, Any]:
    """Decode, resize and flip the source's images in parallel Ray Data tasks (``resources.cpus`` each, as
    many as the cluster runs at once) and write them, in a seeded shuffled order, as fixed-size shards
    ``shards/images-*.npy`` (+ ``shards/labels-*.npy``) with ``dataset.json`` (source, num_images, channels,
    resolution, num_classes, content digest, the shard list). The stage streams: it holds one shard at a
    time.

    Examples:
        data: {kind: prepare_data, params: {source: sklearn-digits}}
        data: {kind: prepare_data, params: {source: cifar10, uri: s3://datasets/cifar-10-python.tar.gz}}
        data: {kind: prepare_data, params: {source: image-folder, uri: s3://imagenet/train, resolution: 64}}
    """
    from cmflow.data.shards import ShardWriter, dataset_meta
    from cmflow.data.sources import open_source

    ctx.progress(0, 1, message=f"opening {params.source}")
    source = open_source(
        params.source, params.uri, params.storage_options, params.resolution, params.use_labels
    )
    chunks = _chunks(params, source.num_items)
    total = sum(len(index) for index, _ in chunks)
    writer = ShardWriter(ctx.out_dir, params.shard_images, has_labels=source.has_labels)
    done = 0
    for images, labels in _decoded(source, chunks, ctx):
        writer.add(images, labels)
        done += images.shape[0]
        ctx.progress(done, total, message=f"{done}/{total} images decoded")
    extra = {"class_names": source.class_names} if source.has_labels and source.class_names else {}
    extra["shuffled"] = params.shuffle
    info = writer.close(source=params.source, num_classes=source.num_classes, extra=extra)
    return dataset_meta(info)
