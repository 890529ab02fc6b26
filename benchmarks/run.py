"""Scoring and training throughput against plain PyTorch, peak memory, and the compute ceiling.

    python -m benchmarks.run [--images 512] [--model mobilenet_v2] [--input-size 224]
                             [--data PATH] [--json out.json] [--skip train,rss10x]

Every number comes from ONE run on the same images and the same model artifact, so the ratios
are meaningful even on a busy machine where absolute images/s are not. Sections (--skip names):

  model     model-only images/s on random tensors (eager fp32, eager channels_last, fast path;
            with a GPU also eager fp32 and the fast path, bf16 autocast, on CUDA), the measured
            fp32 GEMM GFLOP/s and the model's FLOPs per image -> ceiling images/s
  decode    JPEG decoding images/s of the N files: PIL as scoring decodes, torchvision's
            decode_jpeg on the CPU and, with a GPU, on CUDA (nvJPEG, the whole list in one call)
  baseline  plain PyTorch: DataLoader workers decode + preprocess, eager model, one Parquet file
  score     the Ray Data job (pipelines.score.run_scoring) with 1 and 2 actors, eager and --fast
  rss10x    the fast scoring job again on 10x the images (copies under new names), for peak RSS
  train     Ray Train with 1 worker vs the same loop in plain PyTorch (allcore.training.engine)

Each end-to-end run is a subprocess of this script (``--child``); the parent samples the RSS of
its whole process tree (driver + Ray's raylet, GCS and workers) every 0.2 s with psutil. RSS
counts shared pages once per process (Ray's object store, torch libraries), so it overstates
the physical total; it is the same yardstick for every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines import RAY_DEFAULT_WORKER_NICENESS

REPO = Path(__file__).resolve().parents[1]

SECTIONS = ("model", "decode", "baseline", "score", "rss10x", "train")
RSS_SAMPLE_SECONDS = 0.2


# ------------------------------------------------------------------ inputs


def prepare_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The N benchmark images (generated, or the first N of --data, class by class in turn) under
    ``work/images/<Class>/`` and a model artifact built the way training exports one."""
    from allcore.models.artifact import ModelCard, save_artifact
    from allcore.data.samples import discover_samples
    from allcore.data.labels import get_label_set
    from allcore.models.registry import WeightsUnavailableError, create_model
    from allcore.data.synthetic import write_archive

    label_set = get_label_set("all4")
    images = work / "images"
    if args.data:
        by_class = [[s for s in discover_samples(args.data, label_set) if s.label == cls]
                    for cls in label_set.classes]
        chosen = [s for group in zip(*by_class) for s in group][: args.images]
        if len(chosen) < args.images:
            raise ValueError(f"--data {args.data} has only {len(chosen)} images usable class by "
                             f"class; pass --images {len(chosen)} or less")
        for sample in chosen:
            target = images / sample.label / Path(sample.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.path, target)
    else:
        write_archive(images, label_set=label_set, per_class=-(-args.images // 4), size=224)
    torch_seed(0)
    try:
        model = create_model(args.model, num_classes=4, pretrained=True, input_size=args.input_size)
        pretrained = True
    except WeightsUnavailableError:
        model = create_model(args.model, num_classes=4, input_size=args.input_size)
        pretrained = False
    card = ModelCard(classes=list(label_set.classes), label_set="all4",
                     model_version=f"benchmark-{'imagenet' if pretrained else 'random'}")
    return images, save_artifact(str(work / "artifact"), model.eval(), card)


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def copies(images: Path, target: Path, times: int) -> Path:
    """``times`` copies of the image tree under new names (the scoring ledger keys on the path,
    so symlinks to one name would be scored once)."""
    for k in range(times):
        shutil.copytree(images, target / f"copy{k:02d}")
    return target


# ------------------------------------------------------------------ model-only and ceiling


def images_per_second(fn, batch, *, seconds: float = 3.0) -> float:
    """Steady-state throughput of ``fn(batch)``: one warm-up call, then calls for ~``seconds``."""
    fn(batch)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 2:
        fn(batch)
        calls += 1
    return calls * len(batch) / elapsed


def gemm_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """Measured fp32 matmul GFLOP/s (2 * n^3 FLOPs per n x n product): what this machine's BLAS
    can do with the current torch threads, the practical upper bound for convolutions too."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return images_per_second(lambda x: torch.matmul(x, b), a, seconds=seconds) * 2 * size**2 / 1e9


def flops_per_image(model, input_size: int) -> int:
    """FLOPs of one forward pass, counted by torch's FlopCounterMode (1 MAC = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    return counter.get_total_flops()


def model_only(artifact: str, batch_size: int, rounds: int = 2) -> dict:
    """Model-only throughput of each inference path, measured in interleaved rounds (the median
    of the rounds is kept) so that load from other processes hits every path alike."""
    import copy

    import numpy as np
    import torch

    from allcore.models.artifact import load_artifact
    from allcore.scoring.runtimes import probability_function

    model, card = load_artifact(artifact)
    size = int(card.data_config["input_size"])
    cpu = torch.device("cpu")
    pixels = np.random.default_rng(0).normal(0, 1, (batch_size, 3, size, size)).astype(np.float32)
    channels_last = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    def eager_channels_last(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return channels_last(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    paths = {"eager fp32": probability_function(copy.deepcopy(model), input_size=size, fast=False,
                                                device=cpu),
             "eager channels_last": eager_channels_last,
             "fast path": probability_function(copy.deepcopy(model), input_size=size, fast=True,
                                               device=cpu)}
    if torch.cuda.is_available():  # the GPU paths scoring takes there (runtimes.model_outputs)
        cuda = torch.device("cuda")
        paths["cuda eager fp32"] = probability_function(copy.deepcopy(model), input_size=size,
                                                        fast=False, device=cuda)
        paths["cuda fast path (bf16 autocast)"] = probability_function(
            copy.deepcopy(model), input_size=size, fast=True, device=cuda)
    measured = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            measured[name].append(images_per_second(fn, pixels))
    gflops = gemm_gflops()
    flops = flops_per_image(model.eval(), size)
    return {"images_per_s": {name: float(np.median(v)) for name, v in measured.items()},
            "gemm_gflops": gflops, "flops_per_image": flops, "flop_convention": "1 MAC = 2 FLOPs",
            "ceiling_images_per_s": gflops * 1e9 / flops, "torch_threads": torch.get_num_threads()}


def decode_rates(images: Path, rounds: int = 3) -> dict:
    """JPEG decoding images/s of the JPEG files under ``images``, from their bytes in memory to
    RGB pixels: PIL on one thread, as ``prepare_batch`` decodes (``allcore.imaging.files.decode_rgb``);
    ``torchvision.io.decode_jpeg`` on the CPU, one image a call; and, where there is a GPU, on
    CUDA with the whole list in one call (nvJPEG's batched decode; pixels left on the GPU, the
    device synchronised before the clock stops). The median of ``rounds`` rounds each."""
    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from allcore.imaging.files import decode_rgb

    files = [p.read_bytes() for p in sorted(images.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg")]
    if not files:
        return {}
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in files]
    paths = {"decode, PIL (CPU, 1 thread)": lambda: [decode_rgb(data) for data in files],
             "decode, torchvision decode_jpeg (CPU)": lambda: [
                 decode_jpeg(t, mode=ImageReadMode.RGB) for t in tensors]}
    if torch.cuda.is_available():
        def on_gpu():
            decode_jpeg(tensors, mode=ImageReadMode.RGB, device="cuda")
            torch.cuda.synchronize()

        on_gpu()  # nvJPEG's start-up is not decoding
        paths["decode, torchvision decode_jpeg (CUDA, batched)"] = on_gpu
    rates = {}
    for name, decode in paths.items():
        seconds = []
        for _ in range(rounds):
            started = time.perf_counter()
            decode()
            seconds.append(time.perf_counter() - started)
        rates[name] = len(files) / float(np.median(seconds))
    return rates


def agreement(artifact: str, images: Path, batch_size: int) -> dict:
    """Fast path vs eager fp32 on the benchmark images (real ones with --data): share of
    identical argmax and the largest absolute probability difference."""
    import numpy as np
    import torch

    from allcore.models.artifact import load_artifact, read_card
    from allcore.scoring.runtimes import probability_function
    from allcore.scoring.prepare import prepare_batch, prepare_kwargs
    from allcore.imaging.files import iter_image_files

    uris = np.array([info.uri for info in iter_image_files(str(images))], dtype=object)
    card, cpu = read_card(artifact), torch.device("cpu")
    size = int(card.data_config["input_size"])
    pixels = np.concatenate([prepare_batch({"source_uri": uris[i:i + batch_size]},
                                           **prepare_kwargs(card))["pixels"]
                             for i in range(0, len(uris), batch_size)])
    probs = {fast: np.concatenate([
        fn(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
        for fast in (False, True)
        for fn in [probability_function(load_artifact(artifact)[0], input_size=size, fast=fast,
                                        device=cpu)]}
    return {"images": len(uris),
            "identical_argmax": float((probs[True].argmax(1) == probs[False].argmax(1)).mean()),
            "max_abs_probability_difference": float(np.abs(probs[True] - probs[False]).max())}


# ------------------------------------------------------------------ children (one process each)


def child_baseline(spec: dict) -> dict:
    """What a user of the papers' scripts runs: one process, DataLoader workers decoding and
    preprocessing, the eager model under no_grad, one Parquet file written with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from allcore.models.artifact import load_artifact
    from allcore.data.samples import discover_samples
    from allcore.training.build import ImageDataset
    from allcore.data.labels import get_label_set
    from allcore.models.registry import probabilities
    from allcore.imaging.transforms import eval_transform

    started = time.perf_counter()
    model, card = load_artifact(spec["artifact"])
    label_set = get_label_set(card.label_set)
    samples = discover_samples(spec["images"], label_set)
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, label_set, eval_transform(card.data_config_obj())),
        batch_size=spec["batch_size"], num_workers=os.cpu_count() or 1)
    probs = torch.cat([probabilities(model, images) for images, _ in loader]).numpy()
    table = {"source_uri": [s.path for s in samples],
             "pred_label": [card.classes[i] for i in probs.argmax(1)],
             **{f"prob_{c}": probs[:, j] for j, c in enumerate(card.classes)}}
    pq.write_table(pa.table(table), Path(spec["output"]) / "predictions.parquet")
    return {"images": len(samples), "seconds": time.perf_counter() - started}


# Ray's own defaults for what pipelines.IN_PROCESS_RAY_ENV turns off in a Ray started in-process
RAY_TELEMETRY_DEFAULTS = {"RAY_task_events_report_interval_ms": "1000",
                          "RAY_enable_metrics_collection": "1", "RAY_event_stats": "1",
                          "RAY_TRAIN_METRICS_ENABLED": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}


def _init_ray(spec: dict) -> None:
    """Ray as the jobs start it (``pipelines.init_ray``); ``spec["worker_niceness"]`` overrides
    the niceness of Ray's workers (Ray's own default is 15) to measure what it costs, and
    ``spec["ray_telemetry"]`` keeps Ray's telemetry and Ray Train's placement-group cleaner, as
    before ``init_ray`` turned them off."""
    import pipelines
    from pipelines import init_ray

    if spec.get("worker_niceness") is not None:
        os.environ["RAY_worker_niceness"] = str(spec["worker_niceness"])
    if spec.get("ray_telemetry"):
        assert RAY_TELEMETRY_DEFAULTS.keys() <= pipelines.IN_PROCESS_RAY_ENV.keys()
        os.environ.update(RAY_TELEMETRY_DEFAULTS)
        import ray.train.torch

        import pipelines.train

        pipelines.train.InProcessTorchTrainer = ray.train.torch.TorchTrainer
    init_ray(verbose=False, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})


def child_score(spec: dict) -> dict:
    """The Ray Data job as ``jobs/score.py`` runs it; seconds are the job's own (after Ray has
    started, including actor start-up and model loading)."""
    from allcore.scoring.config import ScoringConfig
    from pipelines.score import run_scoring

    _init_ray(spec)
    summary = run_scoring(ScoringConfig(
        model=spec["artifact"], input=spec["images"], output=spec["output"],
        batch_size=spec["batch_size"], actors=(spec["actors"], spec["actors"]),
        inference="fast" if spec["fast"] else "exact"))
    if summary.errors or summary.ok != spec["expected"]:
        raise RuntimeError(f"scoring run did not score every image: {summary.line()}")
    return {"images": summary.ok, "seconds": summary.seconds}


def _train_result(history: list[dict]) -> dict:
    """Images, wall seconds and CPU seconds of the epochs (``engine.fit``'s own timing and its
    count of the images an epoch touched, training plus validation, over all workers), and
    images/s of the epochs after the first (``later_images_per_s``): the first also holds the
    start-up of its data loader's processes and, under Ray Train, of Ray's actors beside it."""
    images = [row["train_images"] + row["val_images"] for row in history]
    later = [row["epoch_seconds"] for row in history[1:]]
    return {"images": sum(images),
            "seconds": sum(row["epoch_seconds"] for row in history),
            "cpu_seconds": sum(row["epoch_cpu_seconds"] for row in history),
            "later_images_per_s": sum(images[1:]) / sum(later) if later else math.nan}


def child_ray_train(spec: dict) -> dict:
    """pipelines.train with one Ray Train worker; images/s from the worker's own epoch timing."""
    from allcore.models.recipes import Recipe
    from pipelines.train import TrainJob, run_training

    recipe = Recipe.from_dict(spec["recipe"])
    _init_ray(spec)
    artifact = run_training(TrainJob(recipe=recipe, data=spec["images"], output=spec["output"],
                                     name="bench", split_manifest=spec["split_manifest"]))[0]
    history = json.loads((Path(artifact) / "history.json").read_text())
    return _train_result(history)


def child_plain_train(spec: dict) -> dict:
    """The same epochs in plain PyTorch: the loop train_loop_per_worker runs (engine.fit), minus
    Ray; seconds are fit's own epoch timing, as for the Ray Train row. With ``spec["beside_ray"]``
    this process first starts Ray as the jobs do and leaves it idle (its daemons and this
    process's Ray threads run beside the loop)."""
    import torch

    if spec.get("beside_ray"):
        _init_ray(spec)

    from allcore.training import engine
    from allcore.data.labels import get_label_set
    from allcore.models.recipes import Recipe
    from allcore.data.splits import SplitManifest
    from allcore.training.build import build_criterion, build_datasets, build_loaders, build_model

    recipe = Recipe.from_dict(spec["recipe"])
    label_set = get_label_set(recipe.label_set)
    torch.manual_seed(recipe.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(recipe, label_set).to(device)
    datasets = build_datasets(SplitManifest.read(spec["split_manifest"]), recipe, label_set,
                              model.data_config)
    history = engine.fit(model, build_criterion(recipe, datasets["train"], label_set.num_classes,
                                                device),
                         *build_loaders(datasets, recipe, device), device, recipe,
                         num_classes=label_set.num_classes)
    return _train_result(history)


CHILDREN = {"baseline": child_baseline, "score": child_score, "ray_train": child_ray_train,
            "plain_train": child_plain_train}
RESULT_PREFIX = "BENCHMARK-RESULT "


def run_child(kind: str, spec: dict, work: Path, label: str) -> dict:
    """Run one measurement in a subprocess; add its images/s and the peak RSS of its tree."""
    import psutil

    slug = re.sub(r"\W+", "_", label).strip("_").lower()
    output = work / "out" / slug
    output.mkdir(parents=True)
    spec = {**spec, "output": str(output)}
    log_path = work / f"{slug}.log"
    print(f"[bench] {label} ...", flush=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.run", "--child", kind,
                                    json.dumps(spec)], env={**os.environ, "PYTHONPATH": str(REPO)},
                                   stdout=subprocess.PIPE, stderr=log, text=True)
        root, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            peak = max(peak, _tree_rss(root))
            time.sleep(RSS_SAMPLE_SECONDS)
        stdout = process.stdout.read()
    results = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if process.returncode != 0 or not results:
        raise RuntimeError(f"{label} failed (exit {process.returncode}); see {log_path}")
    result = json.loads(results[-1][len(RESULT_PREFIX):])
    return {"name": label, **result, "images_per_s": result["images"] / result["seconds"],
            "peak_rss_mb": peak / 2**20}


def _tree_rss(root) -> int:
    import psutil

    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return total


# ------------------------------------------------------------------ report


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
    cpu = {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in lscpu.splitlines())
           if k.strip() in wanted}
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(), **cpu}


def print_table(rows: list[dict], baseline: float | None, ceiling: float | None) -> None:
    print(f"\n{'measurement':<52}{'images/s':>10}{'x baseline':>12}{'% ceiling':>11}"
          f"{'peak RSS MB':>13}")
    for row in rows:
        if "ratios" in row:  # a paired comparison, not a throughput
            print(f"{row['name']:<52}{row['ratio_median']:>10.2f}x median of "
                  + ", ".join(f"{r:.2f}" for r in row["ratios"]))
            continue
        speed = row["images_per_s"]
        ratio = f"{speed / baseline:.2f}" if baseline and not row.get("decode_only") else "-"
        share = f"{100 * speed / ceiling:.0f}%" if ceiling and not row.get("decode_only") else "-"
        rss = f"{row['peak_rss_mb']:.0f}" if row.get("peak_rss_mb") else "-"
        print(f"{row['name']:<52}{speed:>10.1f}{ratio:>12}{share:>11}{rss:>13}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="images N (default %(default)s)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="scoring batch size")
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--train-pairs", type=int, default=5, help="interleaved rounds of the "
                        "train section (plain loop, Ray Train)")
    parser.add_argument("--train-default-niceness", action="store_true", help="each round also "
                        "runs Ray Train with its workers at Ray's default niceness 15")
    parser.add_argument("--train-ray-telemetry", action="store_true", help="each round also runs "
                        "Ray Train with Ray's telemetry and Ray Train's placement-group cleaner, "
                        "which pipelines.init_ray turns off in an in-process Ray")
    parser.add_argument("--train-beside-ray", action="store_true", help="each round also runs the "
                        "plain loop in a process that started Ray and leaves it idle: what Ray's "
                        "presence costs, apart from Ray Train's own work")
    parser.add_argument("--data", help="class-folder tree of real images (default: generated)")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--skip", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--workdir", help="keep inputs and outputs here (default: a temp dir)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child[0]](json.loads(args.child[1]))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS) or args.images < 8:
        parser.error(f"--skip takes {','.join(SECTIONS)}; --images must be >= 8")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="allcore-bench-"))
    report: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                    "machine": machine(), "images": args.images, "model": args.model,
                    "input_size": args.input_size, "batch_size": args.batch_size,
                    "data": args.data or "generated (allcore.data.synthetic.write_archive, 224 px)"}
    images, artifact = prepare_inputs(args, work)
    common = {"artifact": artifact, "images": str(images), "batch_size": args.batch_size,
              "expected": args.images if args.data else 4 * -(-args.images // 4)}
    rows: list[dict] = []
    if "model" not in skip:
        report["model_only"] = model_only(artifact, args.batch_size)
        report["fast_vs_eager"] = agreement(artifact, images, args.batch_size)
        print(f"[bench] fast vs eager: {report['fast_vs_eager']}", flush=True)
        rows += [{"name": f"model only, {name}", "images_per_s": speed}
                 for name, speed in report["model_only"]["images_per_s"].items()]
    if "decode" not in skip:
        report["decode_images_per_s"] = decode_rates(images)
        rows += [{"name": name, "images_per_s": speed, "decode_only": True}
                 for name, speed in report["decode_images_per_s"].items()]
    if "baseline" not in skip:
        rows.append(run_child("baseline", common, work, "plain PyTorch baseline"))
    if "score" not in skip:
        for fast in (False, True):
            for actors in (1, 2):
                rows.append(run_child("score", {**common, "actors": actors, "fast": fast}, work,
                                      f"Ray Data {actors} actor(s){' fast' if fast else ''}"))
    if "rss10x" not in skip:
        many = copies(images, work / "images10x", 10)
        rows.append(run_child("score", {**common, "images": str(many), "actors": 2, "fast": True,
                                        "expected": 10 * common["expected"]},
                              work, "Ray Data 2 actor(s) fast 10xN"))
        at_n = next((r for r in rows if r["name"] == "Ray Data 2 actor(s) fast"), None)
        if at_n is not None:
            report["rss_growth_10x"] = rows[-1]["peak_rss_mb"] / at_n["peak_rss_mb"] - 1
            # the two runs differ only by 9N images: their time difference has no start-up cost
            marginal = (rows[-1]["images"] - at_n["images"]) / (rows[-1]["seconds"] - at_n["seconds"])
            rows.append({"name": "Ray Data 2 actor(s) fast, steady", "images_per_s": marginal})
    if "train" not in skip:
        rows += training_rows(args, images, work)
    baseline = next((r["images_per_s"] for r in rows if r["name"] == "plain PyTorch baseline"), None)
    ceiling = report.get("model_only", {}).get("ceiling_images_per_s")
    report["rows"] = rows
    print_table(rows, baseline, ceiling)
    if ceiling:
        m = report["model_only"]
        print(f"\nceiling: {m['gemm_gflops']:.1f} GFLOP/s fp32 GEMM / "
              f"{m['flops_per_image'] / 1e9:.3f} GFLOP per image ({m['flop_convention']}) = "
              f"{ceiling:.0f} images/s with {m['torch_threads']} torch threads")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def training_rows(args: argparse.Namespace, images: Path, work: Path) -> list[dict]:
    """Ray Train (1 worker) and the plain loop on one split manifest written here, so both
    train on exactly the same images in the same order. ``--train-pairs`` rounds, interleaved
    with the order alternating, so that load from other processes hits both alike; with
    ``--train-default-niceness`` each round also runs Ray Train with Ray's default worker
    niceness (15), what it cost before ``pipelines.init_ray`` set it to the driver's; with
    ``--train-ray-telemetry`` also Ray Train with Ray's telemetry on (``_init_ray``); with
    ``--train-beside-ray`` also the plain loop in a process that started Ray."""
    from allcore.data.samples import discover_samples
    from allcore.data.labels import get_label_set
    from allcore.models.recipes import load_recipe
    from allcore.data.splits import split_samples

    recipe = load_recipe("demo").override([
        f"model={args.model}", f"input_size={args.input_size}", f"epochs={args.train_epochs}",
        f"batch_size={args.train_batch_size}"])
    samples = discover_samples(str(images), get_label_set(recipe.label_set))
    manifest = work / "split_manifest.csv"
    split_samples(samples, fractions=recipe.split, seed=recipe.seed,
                  strategy=recipe.split_strategy).write(str(manifest))
    spec = {"recipe": recipe.to_dict(), "images": str(images), "split_manifest": str(manifest)}
    runs = [("plain_train", spec, "train: plain PyTorch loop"),
            ("ray_train", spec, "train: Ray Train 1 worker")]
    if args.train_default_niceness:
        runs.append(("ray_train", {**spec, "worker_niceness": RAY_DEFAULT_WORKER_NICENESS},
                     "train: Ray Train, niceness 15"))
    if args.train_ray_telemetry:
        runs.append(("ray_train", {**spec, "ray_telemetry": True}, "train: Ray Train, Ray telemetry"))
    if args.train_beside_ray:
        runs.append(("plain_train", {**spec, "beside_ray": True}, "train: plain loop beside idle Ray"))
    rows = []
    for round_ in range(args.train_pairs):
        for kind, run_spec, label in runs if round_ % 2 == 0 else runs[::-1]:
            rows.append({**run_child(kind, run_spec, work, f"{label} #{round_ + 1}"),
                         "group": label})
    for label in [label for _, _, label in runs[1:]]:
        pairs = list(zip(_group(rows, label), _group(rows, runs[0][2])))
        ratios = [ray["images_per_s"] / plain["images_per_s"] for ray, plain in pairs]
        rows.append({"name": f"{label} / plain", "ratio_median": statistics.median(ratios),
                     "ratios": ratios})
        later = [ray["later_images_per_s"] / plain["later_images_per_s"] for ray, plain in pairs]
        rows.append({"name": f"{label} / plain, epochs 2+", "ratio_median": statistics.median(later),
                     "ratios": later})
        # images per CPU-second: the work per image, whatever share of the cores a run got
        cpu_ratios = [plain["cpu_seconds"] / plain["images"] / (ray["cpu_seconds"] / ray["images"])
                      for ray, plain in pairs]
        rows.append({"name": f"{label} / plain, per CPU-s", "ratio_median":
                     statistics.median(cpu_ratios), "ratios": cpu_ratios})
    return rows


def _group(rows: list[dict], label: str) -> list[dict]:
    return [row for row in rows if row.get("group") == label]

if __name__ == "__main__":
    sys.exit(main())
