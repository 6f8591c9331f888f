"""The servable consistency model: an MLflow pyfunc *model from code* over safetensors weights + JSON config.

Nothing is pickled. The logged model holds two artifacts, ``weights`` (``model.safetensors``) and ``config``
(``model.json``, see :mod:`cmflow.models.io`), and a copy of this file as its code. MLflow runs that copy
when it loads the model (the module name is then not ``cmflow.serving``, and the last line calls
``mlflow.models.set_model``); the copy builds the network with :func:`cmflow.models.io.load_model`, so the
loading environment needs cmflow, torch and safetensors installed (``--env-manager local``).

One request is one row (a dict, a one-row DataFrame, or a list holding one dict)::

    {"task": "generate", "num_samples": 4, "steps": 1, "seed": 0}
    {"task": "generate", "steps": [80.0, 0.821]}                     # explicit sigmas (CM Algorithm 1)
    {"task": "inpaint", "image": uint8 (N, C, H, W), "mask": (H, W) with 1 = generate}
    {"task": "colorize", "image": uint8 (N, 1, H, W)}               # needs a 3-channel model
    {"task": "superres", "image": uint8 (N, C, H/p, W/p)}            # p = model resolution / input size

``steps`` is a count (1 = one-step sampling with sigma_max; 2 = ``model.json``'s
``sampling.two_step_sigmas`` when present; K = the descending K-point Karras grid) or a list of sigmas.
Editing (CM Algorithm 4) defaults to 18 steps. ``class_labels`` (one int, or one per sample) is needed
for class-conditional models; otherwise labels are drawn from the per-sample seeds. The output is a
uint8 array (N, C, H, W); the REST server returns it as nested lists under ``predictions``
(``mlflow models serve``, every task's request and response: docs/serving.md).

Seeds are per sample (sample i uses ``seed + i``, :class:`~cmflow.diffusion.rng.StackedRandomGenerator`),
so the same request returns the same images for any ``num_samples`` prefix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmflow.errors import InputError

CODE_FILE = Path(__file__)
TASKS = ("generate", "inpaint", "colorize", "superres")
MAX_SAMPLES = 1024
MAX_STEPS = 1000
DEFAULT_EDIT_STEPS = 18  # CM editing uses the whole training grid (18 points for CIFAR-10)
INPUT_EXAMPLE = {"num_samples": 2, "steps": 1, "seed": 0, "task": "generate"}


@dataclass(frozen=True)
class Request:
    """One validated pyfunc request."""

    task: str = "generate"
    num_samples: int = 1
    steps: int | tuple[float, ...] | None = None  # None: 1 for generate, 18 for editing
    seed: int = 0
    class_labels: tuple[int, ...] | None = None
    image: Any = None  # numpy uint8, (N, C, H, W)
    mask: Any = None  # numpy bool, broadcastable to (N, C, H, W); True = generate


# --------------------------------------------------------------------------------------------------
# Request parsing (pure; no torch)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


def _row(model_input: Any) -> dict[str, Any]:
    """The single request row of a dict, a list of dicts or a DataFrame; missing cells dropped."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "iloc"):  # pandas DataFrame
        if len(model_input) != 1:
            raise InputError(f"send one request row, got {len(model_input)}; ask for more with num_samples")
        row = model_input.iloc[0].to_dict()
    elif isinstance(model_input, list | tuple):
        if len(model_input) != 1 or not isinstance(model_input[0], dict):
            raise InputError("send one request: a dict, or a list holding one dict")
        row = dict(model_input[0])
    elif isinstance(model_input, dict):
        row = dict(model_input)
    else:
        raise InputError(f"a request is a dict or a one-row DataFrame, got {type(model_input).__name__}")
    return {str(k): v for k, v in row.items() if not _missing(v)}


def _int(row: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = row.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {value!r}") from None
    if number != value or not lo <= number <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return number


def _steps(value: Any) -> int | tuple[float, ...] | None:
    import numpy as np

    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"steps must be a count or a list of sigmas, got {value!r}") from None
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        count = float(array)
        if count != int(count) or not 1 <= count <= MAX_STEPS:
            raise InputError(f"steps must be a count in [1, {MAX_STEPS}] or a list of sigmas, got {value!r}")
        return int(count)
    sigmas = tuple(float(s) for s in array.reshape(-1))
    if not sigmas or len(sigmas) > MAX_STEPS or not all(math.isfinite(s) and s > 0 for s in sigmas):
        raise InputError(f"steps as sigmas must be 1..{MAX_STEPS} positive numbers, got {value!r}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise InputError(f"steps as sigmas must be strictly decreasing, got {list(sigmas)}")
    return sigmas


def _image(value: Any, name: str) -> Any:
    import numpy as np

    array = np.asarray(value)
    if array.dtype == object:
        array = np.asarray(array.tolist())
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.size == 0:
        raise InputError(f"{name} must be (H, W), (C, H, W) or (N, C, H, W), got shape {array.shape}")
    if name == "image":
        if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 255:
            raise InputError("image must hold uint8 values in [0, 255]")
        return array.astype(np.uint8)
    return array.astype(bool)


def parse_request(model_input: Any) -> Request:
    """Validate a pyfunc input (dict, list of one dict, one-row DataFrame) into a :class:`Request`."""
    row = _row(model_input)
    known = {"task", "num_samples", "steps", "seed", "class_labels", "image", "mask"}
    unknown = sorted(set(row) - known)
    if unknown:
        import difflib

        hints = [m for u in unknown for m in difflib.get_close_matches(u, sorted(known), n=1)]
        fix = f"did you mean {', '.join(hints)}?" if hints else f"known: {', '.join(sorted(known))}"
        raise InputError(f"unknown request field(s) {', '.join(unknown)}; {fix}")
    task = str(row.get("task", "generate"))
    if task not in TASKS:
        raise InputError(f"task {task!r} is not supported; use one of: {', '.join(TASKS)}")
    image = _image(row["image"], "image") if "image" in row else None
    mask = _image(row["mask"], "mask") if "mask" in row else None
    if task != "generate" and image is None:
        raise InputError(f"task {task} needs an image (uint8, (N, C, H, W))")
    if task == "inpaint" and mask is None:
        raise InputError("task inpaint needs a mask (1 = generate, 0 = keep), broadcastable to the image")
    default_n = image.shape[0] if image is not None else 1
    num_samples = _int(row, "num_samples", default_n, 1, MAX_SAMPLES)
    labels = row.get("class_labels")
    class_labels = None
    if labels is not None:
        import numpy as np

        flat = np.asarray(labels).reshape(-1)
        if flat.size == 0 or not np.issubdtype(flat.dtype, np.number) or np.any(flat != np.round(flat)):
            raise InputError(f"class_labels must be integers, got {labels!r}")
        class_labels = tuple(int(v) for v in flat)
        if len(class_labels) not in {1, num_samples}:
            raise InputError(f"class_labels needs 1 or {num_samples} values, got {len(class_labels)}")
    return Request(
        task=task,
        num_samples=num_samples,
        steps=_steps(row.get("steps")),
        seed=_int(row, "seed", 0, 0, 2**63 - 1),
        class_labels=class_labels,
        image=image,
        mask=mask,
    )


# --------------------------------------------------------------------------------------------------
# Sampling (torch)


def sigmas_for(
    steps: int | tuple[float, ...] | None, config: dict[str, Any], task: str = "generate"
) -> list[float]:
    """Noise levels for a request: explicit sigmas, or a count mapped onto the model's schedule."""
    from cmflow.diffusion.noise_levels import karras_sigmas

    precond = config.get("precond", {})
    sigma_min, sigma_max = float(precond.get("sigma_min", 0.002)), float(precond.get("sigma_max", 80.0))
    if isinstance(steps, tuple):
        if steps[0] > sigma_max * (1 + 1e-9) or steps[-1] < sigma_min:
            raise InputError(f"sigmas must lie in [{sigma_min}, {sigma_max}], got {list(steps)}")
        return list(steps)
    count = steps if steps is not None else (1 if task == "generate" else DEFAULT_EDIT_STEPS)
    if count == 1:
        return [sigma_max]
    two_step = (config.get("sampling") or {}).get("two_step_sigmas")
    if count == 2 and task == "generate" and two_step:
        return [float(s) for s in two_step]
    grid = karras_sigmas(count + 1 if task == "generate" else count, sigma_min, sigma_max).flip(0).tolist()
    # generate: drop the final sigma_min point (its noise std is 0 and f(x, sigma_min) = x)
    return [float(s) for s in (grid[:-1] if task == "generate" else grid)]


def _check_image(request: Request, channels: int, resolution: int) -> tuple[Any, int]:
    """The reference image (repeated to num_samples) and the super-resolution factor (1 otherwise)."""
    import numpy as np

    image = request.image
    n, c, h, w = image.shape
    if n not in {1, request.num_samples}:
        raise InputError(f"image has {n} images but num_samples is {request.num_samples}; send 1 or the same")
    if request.task == "superres":
        factor = resolution // h if h else 0
        if h != w or factor < 1 or factor * h != resolution:
            raise InputError(f"superres needs a square image whose size divides {resolution}, got {h}x{w}")
        if factor == 1:
            raise InputError(
                f"superres of a {h}x{w} image on a {resolution}x{resolution} model would change nothing; "
                f"send a smaller image (e.g. {resolution // 2}x{resolution // 2})"
            )
    else:
        factor = 1
        if (h, w) != (resolution, resolution):
            raise InputError(f"image must be {resolution}x{resolution} for this model, got {h}x{w}")
    want = (1, 3) if request.task == "colorize" else (channels,)
    if c not in want:
        raise InputError(f"{request.task} needs {' or '.join(map(str, want))}-channel images, got {c}")
    if request.task == "colorize" and channels != 3:
        raise InputError(f"colorize needs a 3-channel (RGB) model; this model has {channels} channel(s)")
    if n == 1 and request.num_samples > 1:
        image = np.repeat(image, request.num_samples, axis=0)
    return image, factor


def _class_labels(request: Request, num_classes: int) -> tuple[int, ...] | None:
    """The request's class labels checked against the model (None: drawn per sample when conditional)."""
    if request.class_labels is None:
        return None
    if num_classes == 0:
        raise InputError("this model is unconditional; leave class_labels out")
    if any(not 0 <= v < num_classes for v in request.class_labels):
        raise InputError(f"class_labels must lie in [0, {num_classes}), got {list(request.class_labels)}")
    values = request.class_labels
    return values * request.num_samples if len(values) == 1 else values


def _edit(model: Any, request: Request, config: dict[str, Any], common: dict[str, Any], device: str) -> Any:
    """CM Algorithm 4 for the request's task; float (N, C, H, W) in [-1, 1]."""
    import torch

    from cmflow.diffusion import editing
    from cmflow.diffusion.generate import from_uint8

    channels, resolution = int(config["image"]["channels"]), int(config["image"]["resolution"])
    image, factor = _check_image(request, channels, resolution)
    reference = from_uint8(image, device)  # (N, C, H, W) or (N, C, H/p, W/p)
    sigmas = sigmas_for(request.steps, config, request.task)
    if request.task == "colorize":
        return editing.colorize(model, reference, sigmas, **common)
    if request.task == "superres":
        return editing.super_resolve(model, reference, factor, sigmas, **common)
    mask = torch.as_tensor(request.mask, device=device)
    try:
        mask = torch.broadcast_to(mask, reference.shape)
    except RuntimeError:
        shapes = f"{tuple(mask.shape)} vs images {tuple(reference.shape)}"
        raise InputError(f"mask does not broadcast to the images: {shapes}") from None
    return editing.inpaint(model, reference, mask, sigmas, **common)


def generate_images(model: Any, config: dict[str, Any], request: Request, device: str = "cpu") -> Any:
    """Run one request on a loaded model (:func:`cmflow.models.io.load_model`); uint8 (N, C, H, W) numpy.

    Generation goes through :func:`cmflow.diffusion.generate.sample_images`, the path every stage samples
    with, so a seed gives the same images here as in ``teacher_sample`` and ``evaluate``.
    """
    import torch

    from cmflow.diffusion.generate import sample_images, to_uint8
    from cmflow.diffusion.rng import StackedRandomGenerator

    channels, resolution = int(config["image"]["channels"]), int(config["image"]["resolution"])
    num_classes = int(config.get("num_classes", 0) or 0)
    seeds = [request.seed + i for i in range(request.num_samples)]
    labels = _class_labels(request, num_classes)
    model = model.to(device)
    shape = (channels, resolution, resolution)
    if config.get("kind") == "edm":
        if request.task != "generate" or isinstance(request.steps, tuple):
            raise InputError("an EDM teacher only samples (task generate, a step count); register a CM")
        images, _ = sample_images(
            model,
            seeds,
            shape=shape,
            method="edm",
            num_steps=request.steps or 18,
            num_classes=num_classes,
            class_labels=labels,
        )
        return images.numpy()
    if request.task == "generate":
        sigmas = sigmas_for(request.steps, config)
        images, _ = sample_images(
            model,
            seeds,
            shape=shape,
            method="cm",
            sigmas=sigmas,
            num_classes=num_classes,
            class_labels=labels,
        )
        return images.numpy()
    # editing (CM Algorithm 4): its noise comes from the same per-sample CPU generators
    rng = StackedRandomGenerator("cpu", seeds)
    drawn = (
        labels
        if labels is not None
        else (rng.randint(0, num_classes, (len(seeds),)).tolist() if num_classes else None)
    )
    on_device = torch.tensor(drawn, device=device) if drawn is not None else None
    sigma_min = float(config.get("precond", {}).get("sigma_min", 0.002))
    common = {"generator": rng, "sigma_min": sigma_min, "class_labels": on_device}
    with torch.no_grad():
        return to_uint8(_edit(model, request, config, common, device)).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# MLflow packaging


def signature(config: dict[str, Any]) -> Any:
    """The logged signature: uint8 (N, C, H, W) out, and no input schema.

    The request is checked by :func:`parse_request`, not by MLflow: with an input schema MLflow drops every
    column it does not know (a misspelled ``num_sampels`` silently became the default, or an empty
    DataFrame), so a typo must reach cmflow, which answers one line (a 400 from ``mlflow models serve``).
    """
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    channels, resolution = int(config["image"]["channels"]), int(config["image"]["resolution"])
    outputs = Schema([TensorSpec(np.dtype("uint8"), (-1, channels, resolution, resolution))])
    return ModelSignature(inputs=None, outputs=outputs)


def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's inference costs ~5 s); local version labels such as +cpu dropped."""
    from importlib.metadata import version

    from cmflow import __version__

    names = ("torch", "safetensors", "numpy", "pandas", "mlflow")
    return [f"{name}=={version(name).split('+')[0]}" for name in names] + [f"cmflow=={__version__}"]


def pyfunc_model() -> Any:
    """A fresh instance of the pyfunc class (defined here so that importing this module stays light)."""
    import mlflow.pyfunc

    class ConsistencyModelPyfunc(mlflow.pyfunc.PythonModel):
        """cmflow consistency model: generate, inpaint, colorize or super-resolve; uint8 (N, C, H, W) out."""

        # predict has no type hints on purpose (MLflow would build an input schema from them and drop the
        # fields it does not know); this tells MLflow not to look for them, nor to warn on every load
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            from cmflow.models.io import load_model

            self.config = json.loads(Path(context.artifacts["config"]).read_text())
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            self.model = load_model(context.artifacts["weights"], self.config).to(self.device)

        # No type hints here: MLflow would derive an input schema from them (and then drop unknown fields).
        def predict(self, context, model_input, params=None):
            try:
                return generate_images(self.model, self.config, parse_request(model_input), self.device)
            except InputError as exc:
                raise _refusal(str(exc)) from None

    return ConsistencyModelPyfunc()


def _refusal(message: str) -> Exception:
    """An ``INVALID_PARAMETER_VALUE`` MlflowException (HTTP 400 from ``mlflow models serve``) that keeps its
    one line: the scoring server rewrites a predict error's message to ``Failed to predict data '<the whole
    request>'. Error: …``, which buries cmflow's line under the request it refuses."""
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    class RequestRefused(MlflowException):
        @property
        def message(self) -> str:
            return self._line

        @message.setter
        def message(self, value: str) -> None:
            if not hasattr(self, "_line"):  # set once, by MlflowException.__init__
                self._line = value

    return RequestRefused(message, error_code=INVALID_PARAMETER_VALUE)


@dataclass(frozen=True)
class LoggedPyfunc:
    model_id: str
    model_uri: str  # models:/m-...
    artifact_location: str  # where the files are; the source of a registered version


def log_pyfunc(
    client: Any,
    *,
    run_id: str,
    experiment_id: str,
    name: str,
    weights: str | Path,
    config: str | Path,
    tags: dict[str, str] | None = None,
) -> LoggedPyfunc:
    """Log the model as a LoggedModel of ``run_id`` with an explicit client (no fluent active run).

    This is what ``mlflow.pyfunc.log_model(name=..., python_model=<this file>)`` does, but against
    ``client``'s tracking URI instead of the process-global one.
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    config_dict = json.loads(Path(config).read_text())
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=tags, model_type="cmflow-consistency-model"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="cmflow-pyfunc-") as tmp:
            local = Path(tmp) / "model"
            mlflow_model = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(CODE_FILE),
                artifacts={"weights": str(weights), "config": str(config)},
                signature=signature(config_dict),
                input_example=INPUT_EXAMPLE,
                pip_requirements=pip_requirements(),
                mlflow_model=mlflow_model,
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        raise
    return LoggedPyfunc(logged.model_id, f"models:/{logged.model_id}", logged.artifact_location)


if __name__ != "cmflow.serving":  # executed by MLflow as the logged model's code
    import mlflow.models

    mlflow.models.set_model(pyfunc_model())
