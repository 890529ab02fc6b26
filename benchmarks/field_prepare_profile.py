"""Where a field run's prepare stage spends its time: ``prepare_batch`` (read, hash, decode, image
QC, preprocessing) on real images, profiled in this process on one thread.

    python -m benchmarks.field_prepare_profile --model RUNS/s000m/model \\
        --data ../shared/data/all-taleqani/Original [--images 128]

Prints CPU ms per image for the whole stage and for the functions that dominate it (cumulative
time under cProfile, which inflates small calls; the whole-stage figure is timed without it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import numpy as np


from allcore.models.artifact import verified_card
from allcore.data.samples import discover_samples
from allcore.imaging.files import MAX_PIXELS
from allcore.data.labels import get_label_set
from allcore.scoring.prepare import prepare_batch, prepare_kwargs

WATCHED = ("prepare_batch", "image_qc", "cell_statistics", "find_cells", "estimate_cell_diameter",
           "preprocess_array", "decode_rgb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model artifact (its data config and QC)")
    parser.add_argument("--data", required=True, help="class-folder tree of real images")
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    paths = [s.path for s in discover_samples(args.data, get_label_set("all4"))][:args.images]
    batch = {"source_uri": np.array(paths), "source_size": np.array([os.path.getsize(p) for p in paths]),
             "source_mtime": np.array(["0"] * len(paths)), "listing_error": np.array([""] * len(paths)),
             "error_kind": np.array([""] * len(paths))}
    kwargs = prepare_kwargs(verified_card(args.model), max_pixels=MAX_PIXELS, cell_finder=None,
                            cell_card=None)
    prepare_batch(batch, **kwargs)  # warm: imports, caches
    started = time.process_time()
    prepare_batch(batch, **kwargs)
    print(f"prepare_batch: {1000 * (time.process_time() - started) / len(paths):.1f} CPU ms an image "
          f"({len(paths)} images of {args.data})")
    profile = cProfile.Profile()
    profile.runcall(prepare_batch, batch, **kwargs)
    stats = pstats.Stats(profile).stats
    for (_, _, name), (_, _, _, cumulative, _) in sorted(stats.items(), key=lambda kv: -kv[1][3]):
        if name in WATCHED:
            print(f"  {name}: {1000 * cumulative / len(paths):.1f} ms an image (under cProfile)")


if __name__ == "__main__":
    main()
