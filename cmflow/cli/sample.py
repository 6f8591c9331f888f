"""``cmflow sample MODEL_URI --steps 1 --out grid.png`` and ``cmflow edit TASK MODEL_URI --image ...``.

MODEL_URI is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local MLflow model folder. Both
commands load the registered pyfunc model (:mod:`cmflow.serving`) and write a PNG grid.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cmflow.cli.models import TrackingOpt, tracking_uri

ModelArg = Annotated[str, typer.Argument(help="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output PNG (a grid of the images).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of sample 0 (sample i uses seed + i).", min=0)]
ColsOpt = Annotated[int, typer.Option("--cols", help="Grid columns.", min=1)]


class EditTask(str, Enum):
    inpaint = "inpaint"
    colorize = "colorize"
    superres = "superres"


def parse_steps(text: str) -> int | list[float]:
    """``"2"`` -> 2 (a count); ``"80,0.821"`` -> [80.0, 0.821] (explicit sigmas)."""
    from cmflow.errors import UsageError

    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--steps {text!r} is not a count or a comma-separated list of sigmas") from None
    if len(values) == 1 and "," not in text and values[0].is_integer():
        return int(values[0])
    if not values:
        raise UsageError("--steps is empty; pass a count such as 1 or sigmas such as 80,0.821")
    return values


def read_image(path: Path, what: str = "--image") -> Any:
    """A PNG/JPEG (grey or RGB) as uint8 (1, C, H, W), or a ``.npy`` uint8 array (N, C, H, W)."""
    import numpy as np

    from cmflow.errors import InputError

    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist; pass a PNG or .npy file")
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as picture:
                mode = "L" if picture.mode in {"1", "L", "I", "I;16", "LA"} else "RGB"
                array = np.asarray(picture.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{what} {str(path)!r} is not a readable image: {exc}") from None
        array = array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None]
    return array


def read_mask(path: Path) -> Any:
    """An inpainting mask (N or 1, 1, H, W) bool: white pixels of a PNG, or nonzero values of a .npy."""
    array = read_image(path, "--mask")
    keep_threshold = 0 if path.suffix.lower() == ".npy" else 127
    return (array > keep_threshold).any(axis=1, keepdims=True)


def _predict(model_uri: str, uri: str | None, request: dict[str, Any]) -> Any:
    from cmflow.errors import InputError
    from cmflow.registry import load_pyfunc

    model = load_pyfunc(model_uri, tracking_uri(uri) if model_uri.startswith("models:/") else uri)
    try:
        return model.predict([request])
    except Exception as exc:  # noqa: BLE001 - MlflowException for bad requests
        message = getattr(exc, "message", str(exc))
        raise InputError(f"the model refused the request: {message.splitlines()[0]}") from None


def sample(
    model_uri: ModelArg,
    out: OutOpt = Path("grid.png"),
    steps: Annotated[
        str, typer.Option("--steps", help="Step count (1, 2, ...) or sigmas, e.g. 80,0.821.")
    ] = "1",
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="Images to generate.", min=1)] = 16,
    seed: SeedOpt = 0,
    class_label: Annotated[
        int | None, typer.Option("--class-label", help="Class of every sample (conditional models).")
    ] = None,
    cols: ColsOpt = 8,
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Generate images with a registered consistency model and save them as a PNG grid."""
    from cmflow.data.images import save_grid

    request: dict[str, Any] = {
        "task": "generate",
        "num_samples": num_samples,
        "steps": parse_steps(steps),
        "seed": seed,
    }
    if class_label is not None:
        request["class_labels"] = [class_label]
    images = _predict(model_uri, tracking_uri_, request)
    save_grid(images, out, cols=cols)
    typer.echo(f"wrote {len(images)} images to {out}")


def edit(
    task: Annotated[EditTask, typer.Argument(help="inpaint, colorize or superres.")],
    model_uri: ModelArg,
    image: Annotated[Path, typer.Option("--image", help="Input image (PNG, or .npy uint8 NCHW).")],
    out: OutOpt = Path("edited.png"),
    mask: Annotated[
        Path | None, typer.Option("--mask", help="inpaint: PNG/.npy, white/1 = generate, black/0 = keep.")
    ] = None,
    steps: Annotated[str, typer.Option("--steps", help="Step count or sigmas (default 18).")] = "18",
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", "-n", help="Edits per image.", min=1)
    ] = None,
    seed: SeedOpt = 0,
    cols: ColsOpt = 8,
    tracking_uri_: TrackingOpt = None,
) -> None:
    """Zero-shot editing (CM Algorithm 4): inpaint, colorize or super-resolve an image; writes a PNG grid."""
    from cmflow.data.images import save_grid
    from cmflow.errors import UsageError

    request: dict[str, Any] = {
        "task": task.value,
        "image": read_image(image),
        "steps": parse_steps(steps),
        "seed": seed,
    }
    if task is EditTask.inpaint:
        if mask is None:
            raise UsageError("cmflow edit inpaint needs --mask (white = generate, black = keep)")
        request["mask"] = read_mask(mask)
    if num_samples is not None:
        request["num_samples"] = num_samples
    images = _predict(model_uri, tracking_uri_, request)
    save_grid(images, out, cols=cols)
    typer.echo(f"wrote {len(images)} edited images to {out}")
