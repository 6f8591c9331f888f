"""Models from elsewhere, by URI: released openai/consistency_models ``.pt`` files and diffusers folders in,
diffusers folders out.

* :func:`load_teacher_uri` -- the ``teacher`` stage's ``uri``: a cmflow model folder, or a released EDM
  teacher (``edm_imagenet64_ema.pt``, ``edm_bedroom256_ema.pt``, ``edm_cat256_ema.pt``).
* :func:`import_consistency_model` -- a released CD / CT model (``cd_imagenet64_l2.pt``, ``ct_bedroom256.pt``, ...)
  or a ``ConsistencyModelPipeline`` folder, as a cmflow CM (what ``cmflow models import`` registers).
* :func:`export_diffusers` -- a cmflow CM with the ADM backbone as a folder that
  ``diffusers.ConsistencyModelPipeline.from_pretrained`` loads (``cmflow models export``).

Nothing here unpickles code (``torch.load(weights_only=True)``, safetensors, JSON) or downloads anything;
every problem with a file is one :class:`~cmflow.errors.InputError` line that names it and the fix, raised
before anything is written. The conversions themselves are the pure functions of
:mod:`cmflow.models.openai_format` and :mod:`cmflow.models.diffusers_format`.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from cmflow.errors import InputError, RegistryError, UsageError
from cmflow.loaders import load_model_uri
from cmflow.mlflow_client import experiment_id
from cmflow.models import diffusers_format as dfmt
from cmflow.models.adm import ADM, ADMConfig
from cmflow.models.io import load_state, model_config, save_model
from cmflow.models.openai_format import (
    C_NOISE_SCALE,
    adm_config_for,
    build_openai_model,
    expected_shapes,
    first_mismatch,
    is_openai_state,
    read_torch_state,
)
from cmflow.models.precond import CMPrecond
from cmflow.redact import redact_uri
from cmflow.registry import check_model_name, register_version, resolve_model_uri
from cmflow.storage import open_uri

Format = Literal["auto", "cmflow", "openai", "diffusers"]


def detect_format(uri: str, options: dict[str, Any]) -> str:
    """ "openai" for a single file (a ``.pt``-style state dict), "diffusers" for a folder with
    ``model_index.json``, else "cmflow" (a folder with ``model.json``; its loader names what is missing)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri.rstrip("/"), **options)
        if fs.isfile(path):
            return "openai"
        if fs.exists(f"{path}/model_index.json"):
            return "diffusers"
    except (ValueError, ImportError) as exc:
        raise InputError(f"cannot open {redact_uri(uri)}: {exc}; use a path, file:// or s3:// URI") from None
    return "cmflow"


def read_openai_state(uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """The tensors of a released ``.pt`` file (weights only); a pickle that needs code is refused."""

    where = redact_uri(uri)
    data = open_uri(uri, options)
    try:
        state = read_torch_state(data)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
        other = re.search(r"Unsupported [^\n]{0,80}", str(exc))
        what = (
            f"its pickle calls {needs.group(1)}"
            if needs
            else other.group(0)
            if other
            else "unreadable pickle"
        )
        raise InputError(
            f"{where} was refused: it is not a weights-only state dict ({what}); load it only if you trust "
            "it, then torch.save(model.state_dict())"
        ) from None
    except ValueError as exc:
        raise InputError(f"{where}: {exc}; pass a released openai/consistency_models .pt file") from None
    if not is_openai_state(state):
        raise InputError(
            f"{where} is not an openai/consistency_models UNetModel state dict (no time_embed.0.weight / "
            "input_blocks.0.0.weight / out.2.weight); use format cmflow or diffusers for other files"
        )
    return state


def _openai_model(
    uri: str, options: dict[str, Any], kind: str, preset: str | None, overrides: dict[str, Any]
) -> Any:

    state = read_openai_state(uri, options)
    try:
        config, problem = adm_config_for(state, preset, **overrides)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"cannot describe an ADM for {redact_uri(uri)} ({exc}); fix the preset or overrides"
        ) from None
    if problem is not None:
        raise InputError(
            f"{redact_uri(uri)} is a checkpoint of another architecture or resolution: {problem}; pick the "
            "matching preset (adm-imagenet64, adm-lsun256) or the model's own file"
        )
    return build_openai_model(state, config, kind)


def load_teacher_uri(
    uri: str,
    options: dict[str, Any],
    fmt: Format = "auto",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(EDM teacher in eval mode, its model.json config) from a cmflow folder or a released openai ``.pt``.

    For ``openai`` files ``preset`` (an ``adm-*`` preset; ``None`` tries them all) and ``overrides``
    (ADMConfig fields, e.g. ``dropout``) describe the architecture; the file must fit it key for key.
    """

    fmt = detect_format(uri, options) if fmt == "auto" else fmt
    if fmt == "cmflow":
        return load_model_uri(uri, options, "edm")
    if fmt != "openai":
        raise InputError(
            f"{redact_uri(uri)} is a {fmt} folder; a teacher is a cmflow model folder or a released EDM .pt "
            "(diffusers consistency pipelines hold students: register them with `cmflow models import`)"
        )
    model = _openai_model(uri, options, "edm", preset, overrides or {})
    return model, model_config(model, source="openai")


def import_consistency_model(
    uri: str,
    fmt: Format = "auto",
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(CM in eval mode, extra model.json entries) from a released CD/CT ``.pt`` or a diffusers folder.

    ``preset`` / ``overrides`` describe an openai file's architecture (see :func:`load_teacher_uri`); a
    diffusers folder describes itself.
    """
    options = options or {}
    fmt = detect_format(uri, options) if fmt == "auto" else fmt
    if fmt == "openai":
        return _openai_model(uri, options, "cm", preset, overrides or {}), {"source": "openai"}
    if fmt == "diffusers":
        return read_diffusers_folder(uri, options)
    raise InputError(
        f"{redact_uri(uri)}: format {fmt!r} cannot be imported; use --format openai (a released .pt) or "
        "diffusers (a ConsistencyModelPipeline folder); cmflow models are registered by the register stage"
    )


def _json(uri: str, options: dict[str, Any]) -> dict[str, Any]:

    try:
        data = json.loads(open_uri(uri, options))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{redact_uri(uri)} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{redact_uri(uri)} is not a JSON object")
    return data


def read_diffusers_folder(uri: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A ``ConsistencyModelPipeline`` folder (UNet2DModel + CMStochasticIterativeScheduler) as a cmflow CM."""
    from safetensors.torch import load as st_load

    base = uri.rstrip("/")
    where = redact_uri(base)
    index = _json(f"{base}/model_index.json", options)
    classes = (
        index.get("_class_name"),
        (index.get("unet") or [None])[-1],
        (index.get("scheduler") or [None])[-1],
    )
    if classes != (dfmt.PIPELINE_CLASS, dfmt.UNET_CLASS, dfmt.SCHEDULER_CLASS):
        raise InputError(
            f"{where}/model_index.json describes a {classes[0]} with a {classes[1]} and a {classes[2]}; only a "
            f"{dfmt.PIPELINE_CLASS} with a {dfmt.UNET_CLASS} and a {dfmt.SCHEDULER_CLASS} imports"
        )
    scheduler = _json(f"{base}/{dfmt.SCHEDULER_CONFIG}", options)
    if scheduler.get("_class_name") != dfmt.SCHEDULER_CLASS:
        raise InputError(
            f"{where}/{dfmt.SCHEDULER_CONFIG} is a {scheduler.get('_class_name')!r}, not a {dfmt.SCHEDULER_CLASS}"
        )
    unet = _json(f"{base}/{dfmt.UNET_CONFIG}", options)
    try:
        adm_config = dfmt.adm_config_from_unet(unet)
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{where}: {exc}; only ADM-style UNet2DModels (the openai conversions) import"
        ) from None
    try:
        state = st_load(open_uri(f"{base}/{dfmt.UNET_WEIGHTS}", options))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - SafetensorError is not importable as a class everywhere
        raise InputError(f"{where}/{dfmt.UNET_WEIGHTS} is not valid safetensors ({exc})") from None
    try:
        adm_state = dfmt.from_diffusers_state({k: v.float() for k, v in state.items()}, adm_config)
    except KeyError as exc:
        raise InputError(
            f"{where}/{dfmt.UNET_WEIGHTS} lacks {exc.args[0]} that unet/config.json implies"
        ) from None
    problem = first_mismatch(expected_shapes(adm_config), adm_state)
    if problem is not None:
        raise InputError(f"{where}/{dfmt.UNET_WEIGHTS} does not fit unet/config.json: {problem}")
    unused = sorted(set(state) - set(dfmt.to_diffusers_state(adm_state, adm_config)))
    if unused:
        raise InputError(
            f"{where}/{dfmt.UNET_WEIGHTS} has tensor {unused[0]} that unet/config.json does not describe"
        )
    backbone = ADM(adm_config)
    backbone.load_state_dict(adm_state, strict=True)
    for field, want in (("rho", 7.0), ("s_noise", 1.0), ("clip_denoised", True)):
        if scheduler.get(field, want) != want:
            raise InputError(
                f"{where}/{dfmt.SCHEDULER_CONFIG} has {field} {scheduler[field]!r}; cmflow samples with {want!r}"
            )
    precond = {
        k: float(scheduler.get(k, d))
        for k, d in (("sigma_data", 0.5), ("sigma_min", 0.002), ("sigma_max", 80.0))
    }
    model = CMPrecond(backbone, c_noise_scale=C_NOISE_SCALE, **precond).eval()
    extra = {
        "source": "diffusers",
        "diffusers": {"num_train_timesteps": int(scheduler.get("num_train_timesteps", 40))},
    }
    return model, extra


def export_diffusers(
    weights: bytes | str | Path,
    config: dict[str, Any],
    out_dir: str | Path,
    *,
    num_train_timesteps: int | None = None,
) -> Path:
    """Write the ``ConsistencyModelPipeline`` folder of a cmflow CM (``model.safetensors`` + ``model.json``).

    Refused (:class:`~cmflow.errors.UsageError`, nothing written) for teachers, for cmflow's own UNet
    backbone (it has no diffusers equivalent), for c_noise other than 250 ln sigma, and for an ``out_dir``
    that is not empty. The folder is assembled next to ``out_dir`` and renamed into place.
    """
    from safetensors.torch import save_file

    backbone = config.get("backbone", "unet")
    if config.get("kind") != "cm":
        raise UsageError(
            f"only consistency models export to diffusers; this is a {config.get('kind')!r} model"
        )
    if backbone != "adm":
        raise UsageError(
            f"this model has the {backbone!r} backbone, which has no diffusers equivalent; only models with the "
            "adm backbone export (imported openai/diffusers models, or trained with an adm-* preset)"
        )
    precond = config.get("precond", {})
    if float(precond.get("c_noise_scale", 0.25)) != C_NOISE_SCALE:
        raise UsageError(
            "diffusers' CMStochasticIterativeScheduler feeds the UNet 250 ln sigma; this model uses another c_noise"
        )
    adm_config = ADMConfig.from_dict(config["adm"])
    try:
        unet_config = dfmt.unet_config(adm_config)
    except ValueError as exc:
        raise UsageError(f"this ADM cannot be exported: {exc}") from None
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} exists and is not an empty folder; choose a new folder")
    data = Path(weights).read_bytes() if isinstance(weights, str | Path) else weights
    state = {k.removeprefix("backbone."): v for k, v in load_state(data).items()}
    steps = num_train_timesteps or int((config.get("diffusers") or {}).get("num_train_timesteps", 40))
    scheduler = dfmt.scheduler_config(
        float(precond.get("sigma_min", 0.002)),
        float(precond.get("sigma_max", 80.0)),
        float(precond.get("sigma_data", 0.5)),
        steps,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        (tmp / "model_index.json").write_text(json.dumps(dfmt.MODEL_INDEX, indent=2, sort_keys=True))
        (tmp / dfmt.UNET_CONFIG).write_text(json.dumps(unet_config, indent=2, sort_keys=True))
        (tmp / dfmt.SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2, sort_keys=True))
        save_file(dfmt.to_diffusers_state(state, adm_config), str(tmp / dfmt.UNET_WEIGHTS))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------
# The registry side: ``cmflow models import`` / ``cmflow models export``


def register_imported(
    client: Any,
    uri: str,
    fmt: Format,
    *,
    name: str,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    alias: str | None = "challenger",
    two_step_sigma: float | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Import a released CM and register it as a new version of ``name`` (as the ``register`` stage does:
    the pyfunc of :mod:`cmflow.serving` over ``model.safetensors`` + ``model.json``); returns the version.

    Idempotent per source file: re-importing the same weights reuses the version (tag
    ``cmflow.import_digest``, the sha256 of the written weights).
    """
    import hashlib

    check_model_name(name)
    model, extra = import_consistency_model(uri, fmt, preset=preset, overrides=overrides, options=options)
    sampling: dict[str, Any] = {"one_step_sigmas": [model.sigma_max]}
    if two_step_sigma is not None:
        if not model.sigma_min < two_step_sigma < model.sigma_max:
            raise UsageError(
                f"--two-step-sigma must lie in ({model.sigma_min}, {model.sigma_max}), got {two_step_sigma}"
            )
        sampling["two_step_sigmas"] = [model.sigma_max, float(two_step_sigma)]
    with tempfile.TemporaryDirectory(prefix="cmflow-import-") as tmp:
        config = save_model(model, tmp, sampling=sampling, **extra)
        digest = hashlib.sha256((Path(tmp) / "model.safetensors").read_bytes()).hexdigest()
        exp = experiment_id(client, "cmflow-imports")
        run = client.create_run(
            exp, tags={"cmflow.import_source": redact_uri(uri)}, run_name=f"import-{name}"
        )
        tags = {
            "cmflow.import_source": redact_uri(uri),
            "cmflow.import_format": str(extra.get("source", fmt)),
            "cmflow.import_digest": digest,
            "cmflow.model_digest": digest,
            "cmflow.backbone": str(config.get("backbone")),
        }
        try:
            return register_version(
                client,
                name=name,
                run_id=run.info.run_id,
                experiment_id=exp,
                weights=Path(tmp) / "model.safetensors",
                config=Path(tmp) / "model.json",
                tags=tags,
                alias=alias,
                dedupe_tag="cmflow.import_digest",
                description=f"imported from {redact_uri(uri)}",
            )
        finally:
            client.set_terminated(run.info.run_id)


def export_registered(
    client: Any, model_uri: str, out_dir: str | Path, *, num_train_timesteps: int | None = None
) -> Path:
    """``models:/NAME@ALIAS`` (or ``NAME@ALIAS``, ``NAME/VERSION``) as a diffusers pipeline folder."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri = model_uri if model_uri.startswith("models:/") else f"models:/{model_uri}"
    resolved = resolve_model_uri(client, uri)
    with tempfile.TemporaryDirectory(prefix="cmflow-export-") as tmp:
        try:
            local = Path(
                download_artifacts(
                    artifact_uri=resolved.source, dst_path=tmp, tracking_uri=client.tracking_uri
                )
            )
        except MlflowException as exc:
            raise RegistryError(f"cannot download {uri}: {exc.message.splitlines()[0]}") from None
        found = sorted(local.rglob("model.json"))
        if not found or not (found[0].parent / "model.safetensors").is_file():
            raise InputError(
                f"{uri} holds no model.json + model.safetensors; it was not registered by cmflow"
            )
        config = json.loads(found[0].read_text())
        try:
            return export_diffusers(
                found[0].parent / "model.safetensors",
                config,
                out_dir,
                num_train_timesteps=num_train_timesteps,
            )
        except UsageError as exc:
            raise UsageError(f"{model_uri}: {exc}") from None
