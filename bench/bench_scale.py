"""The scale path measured side by side on one machine (issue 14): memory, parallel speed-ups, DDP overhead.

    python bench/bench_scale.py rss [--sizes 50000,200000,1000000]   # peak RSS of a training worker
    python bench/bench_scale.py prepare [--images 6000]              # prepare_data images/s, 1 vs 2 CPUs
    python bench/bench_scale.py evaluate [--samples 4000]            # evaluate wall time, 1 vs 2 tasks
    python bench/bench_scale.py train [--steps 60]                   # teacher/distill img/s, 1x2, 2x1, 1x1

Run inside the loopback namespace on an otherwise idle machine (``bash .ci/netns .venv/bin/python ...``);
each measurement starts its own local Ray in a fresh subprocess, so the numbers of a row are comparable.
Prints a markdown table per command (docs/benchmarks.md keeps the results).

* ``rss``: datasets of N images of 3 x 32 x 32 written as shards (N x 3 KiB: 150 MB to 3 GB), then the
  teacher stage trains 60 steps on 1 Ray Train worker streaming them; the worker's peak RSS is polled from
  outside (psutil). The whole-dataset loader this replaced held N x 3 KiB per worker.
* ``prepare``: an image folder of ImageNet-like files (256 x 256 RGB JPEGs, resized to 64) through
  ``prepare_data`` with a local Ray of 1 and of 2 CPUs (1 CPU per decode task). (Tiny PNGs decode in
  microseconds and measure only Ray's task start-up and the shard writer.)
* ``evaluate``: the digits evaluation (teacher at NFE 35 and the CM, one seed) with ``num_tasks`` 1 and 2
  (1 CPU each); the reference statistics are computed before, so both runs only sample and embed.
* ``train``: the digits teacher and digits CD at global batch 128 on 1 worker x 2 threads, 2 workers x
  1 thread (DDP over gloo) and 1 worker x 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _ray(num_cpus: int, root: Path) -> None:
    """A local Ray started as ``cmflow run`` starts one (its workers get cmflow's WORKER_ENV)."""
    import ray

    from cmflow.engine.ray_runtime import WORKER_ENV

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(root / "ray"),
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )


def _stage(
    storage_root: str, kind: str, params: dict, inputs: dict, resources: dict
) -> tuple[dict, float, dict]:
    """Run one stage through the engine's worker code in this process: (manifest JSON, seconds, timings)."""
    import uuid

    from cmflow.engine.worker import StageTask, execute_stage
    from cmflow.spec import Resources
    from cmflow.stages.table import STAGES

    task = StageTask(
        run_id="bench",
        stage=kind,
        kind=kind,
        params=STAGES[kind].params_model.model_validate(params).model_dump(mode="json"),
        cache_key=uuid.uuid4().hex * 2,
        components={},
        seed=0,
        resources=Resources(**resources),
        storage_root=storage_root,
        storage_options={},
        inputs=inputs,
    )
    start = time.perf_counter()
    data = json.loads(execute_stage(task))
    seconds = time.perf_counter() - start
    timings = data.pop("timings", {})
    data.pop("node_id", None)
    return data, seconds, timings


# -- the measurements (each runs in its own subprocess: python bench/bench_scale.py _one KIND JSON) ----------


def one_rss(size: int, work: Path) -> dict:
    import numpy as np
    import psutil

    from cmflow.data.shards import ShardWriter
    from cmflow.storage import Storage

    storage = Storage(str(work / "store"))
    folder = work / f"data-{size}"
    writer = ShardWriter(folder, has_labels=False)
    rng = np.random.default_rng(0)
    for start in range(0, size, 50_000):
        writer.add(rng.integers(0, 256, (min(50_000, size - start), 3, 32, 32), dtype=np.uint8))
    info = writer.close(source="bench", num_classes=0)
    manifest = storage.commit("prepare_data", f"{size:064d}", folder, meta={"digest": info["digest"]})
    text = json.loads(manifest.to_json()) | {"uri": manifest.uri}
    _ray(2, work)
    peak = [0]

    def poll() -> None:
        while not done.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if (p.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker") and p.info["memory_info"]:
                    peak[0] = max(peak[0], p.info["memory_info"].rss)
            time.sleep(0.2)

    done = threading.Event()
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    params = {"preset": "tiny", "steps": 60, "batch_size": 128, "checkpoint_every": 0, "grid_samples": 0}
    _stage(storage.root, "teacher", params, {"data": json.dumps(text)}, {"cpus": 1, "workers": 1})
    done.set()
    watcher.join()
    return {"images": size, "dataset_mb": size * 3072 / 2**20, "peak_rss_mb": peak[0] / 2**20}


def one_prepare(cpus: int, work: Path, images: int) -> dict:
    import numpy as np
    from PIL import Image

    folder = work / "jpegs"
    if not folder.exists():  # ImageNet-like files: 256 x 256 JPEGs of smooth random content
        rng = np.random.default_rng(0)
        for i in range(images):
            sub = folder / f"class{i % 10}"
            sub.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            coarse.resize((256, 256), Image.BICUBIC).save(sub / f"{i:06d}.jpg", quality=90)
    _ray(cpus, work)
    params = {"source": "image-folder", "uri": str(folder), "resolution": 64}
    _, seconds, _ = _stage(str(work / f"store-{cpus}"), "prepare_data", params, {}, {"cpus": 1})
    return {"cpus": cpus, "images": images, "seconds": seconds, "images_per_s": images / seconds}


def _digits_models(work: Path) -> tuple[str, str, str]:
    """A digits dataset and two tiny-but-trained-shaped models (random weights are fine for timing)."""
    import torch

    from cmflow.models import CMPrecond, EDMPrecond, make_unet
    from cmflow.models.io import save_model
    from cmflow.storage import Storage

    storage = Storage(str(work / "store"))
    data, _, _ = _stage(
        storage.root, "prepare_data", {"source": "sklearn-digits", "use_labels": False}, {}, {"cpus": 1}
    )
    out = []
    for kind, cls in (("edm", EDMPrecond), ("cm", CMPrecond)):
        torch.manual_seed(0)
        folder = work / kind
        save_model(cls(make_unet("digits", 8, 1)), folder)
        manifest = storage.commit(kind, (kind * 64)[:64], folder)
        out.append(json.dumps(json.loads(manifest.to_json()) | {"uri": manifest.uri}))
    return json.dumps(data), out[0], out[1]


def one_evaluate(tasks: int, work: Path, samples: int) -> dict:
    _ray(2, work)
    data, teacher, model = _digits_models(work)
    params = {"num_samples": samples, "seeds": [0], "midpoint": 0.8, "reuse_teacher": False, "num_tasks": tasks,
              "kid_subsets": 2, "batch_size": 500}  # fmt: skip
    inputs = {"data": data, "model": model, "teacher": teacher}
    _stage(
        str(work / "store"), "evaluate", {**params, "num_samples": 8}, inputs, {"cpus": 1}
    )  # the reference
    _, seconds, timings = _stage(str(work / "store"), "evaluate", params, inputs, {"cpus": 1})
    return {"tasks": tasks, "seconds": seconds, "sampling_s": timings.get("sampling_s")}


def one_train(stage: str, workers: int, cpus: int, work: Path, steps: int) -> dict:
    """The digits ``teacher`` or ``distill`` stage at global batch 128 on ``workers`` x ``cpus``."""
    _ray(2, work)
    data, teacher, _ = _digits_models(work)
    params = {"steps": steps, "batch_size": 128, "checkpoint_every": 0, "grid_samples": 0, "log_every": 10}
    if stage == "teacher":
        params["preset"], inputs = "digits", {"data": data}
    else:
        params["num_scales"], inputs = 10, {"teacher": teacher, "data": data}
    resources = {"cpus": cpus, "workers": workers}
    _, seconds, timings = _stage(str(work / "store"), stage, params, inputs, resources)
    return {"stage": stage, "workers": workers, "threads": cpus, "imgs_per_s": timings.get("imgs_per_s"),
            "seconds": seconds}  # fmt: skip


def _subprocess(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "_one", *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"measurement {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["rss", "prepare", "evaluate", "train", "_one"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--sizes", default="50000,200000,1000000")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if args.command == "_one":
        if args.rest[0] == "train":
            stage, workers, cpus, work, steps = args.rest[1:]
            print(json.dumps(one_train(stage, int(workers), int(cpus), Path(work), int(steps))))
            return
        kind, value, work, extra = args.rest[0], int(args.rest[1]), Path(args.rest[2]), int(args.rest[3])
        fn = {"rss": lambda: one_rss(value, work), "prepare": lambda: one_prepare(value, work, extra),
              "evaluate": lambda: one_evaluate(value, work, extra)}  # fmt: skip
        print(json.dumps(fn[kind]()))
        return
    with tempfile.TemporaryDirectory(prefix="cmflow-bench-scale-") as tmp:
        work = Path(tmp)
        if args.command == "rss":
            rows = [
                _subprocess("rss", str(n), str(work / str(n)), "0") for n in map(int, args.sizes.split(","))
            ]
            print("| images (3x32x32) | dataset | peak worker RSS | vs the smallest |\n|---|---|---|---|")
            for row in rows:
                print(f"| {row['images']:,} | {row['dataset_mb']:.0f} MB | {row['peak_rss_mb']:.0f} MB | "
                      f"{row['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x |")  # fmt: skip
        elif args.command == "prepare":
            rows = [_subprocess("prepare", str(c), str(work), str(args.images)) for c in (1, 2)]
            print("| Ray CPUs | images | seconds | images/s | speed-up |\n|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['cpus']} | {row['images']} | {row['seconds']:.1f} | {row['images_per_s']:.0f} | "
                      f"{row['images_per_s'] / rows[0]['images_per_s']:.2f}x |")  # fmt: skip
        elif args.command == "evaluate":
            rows = [_subprocess("evaluate", str(t), str(work / str(t)), str(args.samples)) for t in (1, 2)]
            print("| tasks | stage seconds | sampling seconds | vs 1 task |\n|---|---|---|---|")
            for row in rows:
                print(f"| {row['tasks']} | {row['seconds']:.1f} | {row['sampling_s']:.1f} | "
                      f"{row['seconds'] / rows[0]['seconds']:.2f}x |")  # fmt: skip
        else:
            print("| stage | workers x threads | img/s (global batch 128) | stage seconds | vs 1 x 2 |")
            print("|---|---|---|---|---|")
            for stage in ("teacher", "distill"):
                rows = [
                    _subprocess("train", stage, str(w), str(c), str(work / f"{stage}{w}{c}"), str(args.steps))
                    for w, c in ((1, 2), (2, 1), (1, 1))
                ]
                for row in rows:
                    print(f"| {stage} | {row['workers']} x {row['threads']} | {row['imgs_per_s']:.0f} | "
                          f"{row['seconds']:.1f} | {row['imgs_per_s'] / rows[0]['imgs_per_s']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
