"""The scoring driver: what it imports and how it cuts the to-do list into blocks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from allcore.scoring.config import ScoringConfig
from pipelines.score import (LARGE_BLOCK_INPUTS, PER_CELL_BLOCK_BYTES, PER_CELL_BLOCK_INPUTS,
                             SMALL_BLOCKS_PER_ACTOR, todo_block_inputs, todo_blocks)

ROOT = Path(__file__).resolve().parents[1]


def test_the_scoring_driver_never_imports_torch_or_scikit_learn():
    """torch alone is ~500 MB resident: the driver, which holds the ledger, must not load it
    (docs/SCORING.md, the 1 GB driver target); the model is built in the actors only."""
    code = ("import sys; import pipelines.score, allcore.scoring.summary, allcore.scoring.drift; "
            "print(sorted(m for m in ('torch', 'sklearn', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_todo_blocks_start_batch_sized_on_every_actor_then_grow():
    config = ScoringConfig(model="m", input="i", output="o", batch_size=32, actors=(1, 3))
    sizes = [todo_block_inputs(config, n) for n in range(SMALL_BLOCKS_PER_ACTOR * 3 + 2)]
    assert sizes[:SMALL_BLOCKS_PER_ACTOR * 3] == [32] * (SMALL_BLOCKS_PER_ACTOR * 3)
    assert sizes[-2:] == [LARGE_BLOCK_INPUTS] * 2


def test_per_cell_blocks_hold_a_bounded_number_of_file_bytes():
    """Large fields one to a block (they spread over the actors), small ones many to a block, a
    file larger than the budget still alone, listing errors (size -1) counted as empty."""
    from allcore.imaging.files import FileInfo

    per_cell = ScoringConfig(model="m", input="i", output="o", per_cell=True, commit_every=1000)
    sizes = [1_700_000, 1_800_000] + [22_000] * 200 + [-1, 500_000, 22_000]
    infos = [FileInfo(f"f{i}.jpg", size, "0") for i, size in enumerate(sizes)]
    blocks = list(todo_blocks(per_cell, [infos[:150], infos[150:]]))
    assert [i for block in blocks for i in block] == infos
    assert [len(b) for b in blocks[:2]] == [1, 1]
    assert all(len(b) <= PER_CELL_BLOCK_INPUTS for b in blocks)
    assert all(len(b) == 1 or sum(max(i.size, 0) for i in b) <= PER_CELL_BLOCK_BYTES for b in blocks)
    small = [len(b) for b in blocks[2:-2]]
    assert small[0] == PER_CELL_BLOCK_BYTES // 22_000 and sum(small) >= 200


def test_todo_blocks_hold_every_input_once_with_a_batch_sized_tail():
    config = ScoringConfig(model="m", input="i", output="o", batch_size=32, actors=(1, 2),
                           commit_every=1000)
    inputs = SMALL_BLOCKS_PER_ACTOR * 2 * 32 + 2 * LARGE_BLOCK_INPUTS + 100
    chunks = [list(range(start, min(start + 1000, inputs))) for start in range(0, inputs, 1000)]
    blocks = list(todo_blocks(config, chunks))
    assert [i for block in blocks for i in block] == list(range(inputs))
    assert [len(b) for b in blocks] == ([32] * SMALL_BLOCKS_PER_ACTOR * 2
                                        + [LARGE_BLOCK_INPUTS] * 2 + [32, 32, 32, 4])


def test_workers_of_an_in_process_ray_run_at_the_drivers_priority_without_numpy_huge_pages(ray_session):
    """pipelines.init_ray's settings reach the processes that score and train, telemetry off
    included (docs/PERFORMANCE.md)."""
    import os

    import ray

    from pipelines import IN_PROCESS_RAY_ENV, NUMPY_HUGE_PAGES, WORKER_NICENESS, ray_started_here

    @ray.remote
    def worker_settings():
        import os

        return os.nice(0), {name: os.environ.get(name) for name in IN_PROCESS_RAY_ENV}

    niceness, environment = ray.get(worker_settings.remote())
    assert niceness == os.nice(0) + int(WORKER_NICENESS)
    assert environment == IN_PROCESS_RAY_ENV
    assert environment["NUMPY_MADVISE_HUGEPAGE"] == NUMPY_HUGE_PAGES
    assert ray_started_here()


def test_in_process_trainer_leaves_out_only_the_placement_group_cleaner():
    """The pinned Ray's hook still builds the callbacks, and the in-process trainer drops the
    cleaner (which needs the state API an in-process Ray does not serve) and nothing else."""
    import ray.train.torch
    from ray.train import ScalingConfig

    from pipelines.train import InProcessTorchTrainer, PlacementGroupCleanerCallback

    def callback_types(trainer_class):
        trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(callback) for callback in trainer._create_default_callbacks()]

    every = callback_types(ray.train.torch.TorchTrainer)
    assert PlacementGroupCleanerCallback in every
    assert callback_types(InProcessTorchTrainer) == [t for t in every
                                                     if t is not PlacementGroupCleanerCallback]
