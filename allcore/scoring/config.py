"""One scoring run's settings, written next to its outputs (``_runs/<run_id>/config.json``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from allcore.imaging.files import MAX_PIXELS

# How a run picks each model's inference path (allcore.scoring.inference_path): the
# fastest path verified for the model (default), eager fp32 (--exact), the fast path (--fast).
INFERENCE_MODES = ("auto", "exact", "fast")


@dataclass(frozen=True)
class ScoringConfig:
    """One scoring run. Written to ``<out>/_runs/<run_id>/config.json`` next to the outputs."""

    model: str  # artifact folder or s3:// prefix
    input: str  # image folder or s3:// prefix, listed recursively (or the base of input_list)
    output: str  # table root, local or s3://
    input_list: str | None = None  # --manifest: text file, one path per line, instead of listing --input
    full: bool = False  # rescore inputs already committed for this model
    batch_size: int = 64
    actors: tuple[int, int] = (1, 2)  # inference actor pool (min, max); Ray autoscales between
    max_error_rate: float = 0.05  # fail the run (after committing) when errors / scored exceed it
    max_review_rate: float = 0.10  # warn and exit 3 (after committing) when flagged / ok exceeds it
    specimen_pattern: str | None = None  # regex on source_uri; group 1 (or whole match) = specimen
    commit_every: int = 4096  # result rows per commit (cells count with --per-cell): bounds the work a crash loses
    max_pixels: int = MAX_PIXELS  # decompression-bomb guard passed to decode_rgb
    inference: str = "auto"  # auto (fastest verified path), exact (--exact: eager fp32) or fast (--fast)
    gpu: bool = False  # one GPU per actor even if none is up yet (autoscaling GPU workers)
    per_cell: bool = False  # also one row per detected white cell (docs/SCORING.md)
    cell_model: str | None = None  # --cell-model: artifact that classifies the cell rows
    cell_diameter_px: float | None = None  # white-cell size in input pixels; None: estimated per run
    mpp: float | None = None  # --mpp: um per pixel of inputs whose files do not say (slides, fields)
    verbose: bool = False  # Ray's INFO logs and progress bars (else one progress line per commit)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.commit_every < 1 or self.max_pixels < 1:
            raise ValueError("batch_size, commit_every and max_pixels must be at least 1")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        low, high = self.actors
        if not 1 <= low <= high:
            raise ValueError(f"actors must be MIN,MAX with 1 <= MIN <= MAX, got {self.actors}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if not 0.0 <= self.max_review_rate <= 1.0:
            raise ValueError(f"max_review_rate must be in [0, 1], got {self.max_review_rate}")
        if (self.cell_model is not None or self.cell_diameter_px is not None) and not self.per_cell:
            raise ValueError("--cell-model and --cell-diameter apply to cell rows: add --per-cell")
        if self.mpp is not None and not 0 < self.mpp <= 50:
            raise ValueError(f"mpp must be micrometres per pixel in (0, 50], got {self.mpp}; a "
                             "40x scan is about 0.25, a 20x scan about 0.5")
        if self.cell_diameter_px is not None and not self.cell_diameter_px > 0:
            raise ValueError(f"cell_diameter_px must be > 0, got {self.cell_diameter_px}")
        if self.specimen_pattern is not None:
            try:
                groups = re.compile(self.specimen_pattern).groups
            except re.error as exc:
                raise ValueError(f"specimen_pattern {self.specimen_pattern!r} is not a valid "
                                 f"regex: {exc}") from None
            if groups > 1:
                raise ValueError("specimen_pattern may have at most one capture group "
                                 f"(the specimen id); {self.specimen_pattern!r} has {groups}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ScoringConfig":
        values = json.loads(text)
        if "manifest" in values:  # the name of input_list in config.json of earlier runs
            values["input_list"] = values.pop("manifest")
        if "fast" in values:  # earlier runs: eager unless --fast
            values["inference"] = "fast" if values.pop("fast") else "exact"
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown scoring config keys {sorted(unknown)}; "
                             f"valid keys: {[f.name for f in dataclasses.fields(cls)]}")
        if "actors" in values:
            values["actors"] = tuple(values["actors"])
        return cls(**values)
