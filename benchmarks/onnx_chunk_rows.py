"""How many rows to give ONNX Runtime per call on CPU (``allcore.scoring.onnx.ONNX_CHUNK_PIXELS``).

    python -m benchmarks.onnx_chunk_rows [--model mobilenet_v2] [--sizes 96,128,224] [--threads 1,2]

Model-only milliseconds per image of the model's ONNX Runtime session (exported as scoring
exports it, ``onnx_session``; random weights: speed does not depend on them) on random pixels, by
rows per ``session.run`` call, for each input size and thread count; "chunked" is what scoring
runs: 256 rows cut into calls of ``ONNX_CHUNK_PIXELS // size**2`` rows. Wall time, best of three
rounds of at least 256 images each.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

ROWS = (1, 2, 4, 8, 16, 32, 64, 256)


def ms_per_image(run, pixels: np.ndarray, rows: int) -> float:
    """Best of three rounds of 256 images (at least one call) in calls of ``rows`` rows."""
    run(pixels[:rows])  # warm-up: first-call allocations
    best = np.inf
    for _ in range(3):
        started = time.perf_counter()
        calls = max(1, len(pixels) // rows)
        for _ in range(calls):
            run(pixels[:rows])
        best = min(best, (time.perf_counter() - started) / (calls * rows))
    return 1000 * best


def main(argv: list[str] | None = None) -> int:
    import torch

    from allcore.models.registry import create_model
    from allcore.scoring.onnx import ONNX_CHUNK_PIXELS
    from allcore.scoring.runtimes import fast_outputs, onnx_session

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--sizes", default="96,128,224", help="input sizes, comma-separated")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts, comma-separated")
    args = parser.parse_args(argv)
    print(f"| {args.model} input px | threads | " + " | ".join(f"{r} rows" for r in ROWS)
          + " | chunked (rows) | 256 rows ÷ chunked |")
    print("|---|---:|" + "---:|" * (len(ROWS) + 2))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)  # the session takes its thread count from torch
        for size in (int(s) for s in args.sizes.split(",")):
            model = create_model(args.model, num_classes=4, input_size=size).eval()
            session = onnx_session(model, size)
            if session is None:
                raise SystemExit("onnxruntime is not installed: pip install 'allcore[fast]'")
            pixels = np.random.default_rng(0).random((256, 3, size, size), dtype=np.float32)
            times = [ms_per_image(lambda x: session.run(None, {"pixels": x}), pixels, rows) for rows in ROWS]
            chunked = fast_outputs(model, torch.device("cpu"), size)
            chunked_ms = ms_per_image(chunked, pixels, len(pixels))
            print(f"| {size} | {threads} | " + " | ".join(f"{t:.2f}" for t in times)
                  + f" | {chunked_ms:.2f} ({max(1, ONNX_CHUNK_PIXELS // size ** 2)}) | {times[-1] / chunked_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
