"""The run's drift summary: are this run's images still the kind the model was trained on?

One row being flagged is that row's business; many rows flagged in one run means the archive
changed (a new scanner, stain, magnification) and the night's calls should not be used before
someone looks. So every run writes, beside its accounting under ``_runs/<run_id>/``:

    drift.json  per QC statistic: this run's quantiles against the model card's training range
                (``trust.qc_reference``) and the share of fields outside it; the OOD score's
                quantiles against its threshold; the flagged fraction and its reasons
    drift.png   the same as a picture, one panel per statistic

Everything is aggregated in DuckDB over the run's committed files, so the driver never holds the
rows. Field rows scored ok are the population (cell rows are judged by their field).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence

import duckdb

from allcore.imaging.files import filesystem, join, write_bytes
from allcore.imaging.qc import QC_COLUMNS
from allcore.trust.checks import trust_from_card_section

DRIFT_JSON, DRIFT_PNG = "drift.json", "drift.png"
QUANTILES = (0.05, 0.5, 0.95)


def _run_fields(con: duckdb.DuckDBPyConnection, files: Sequence[str]) -> None:
    con.execute("CREATE TABLE fields AS SELECT * FROM read_parquet(?, union_by_name = true) "
                "WHERE row_kind = 'field' AND status = 'ok'", [list(files)])


def _statistic(con: duckdb.DuckDBPyConnection, column: str,
               reference: Mapping[str, float] | None) -> dict:
    """Quantiles of ``column`` over the run's fields, and the share outside ``reference``."""
    low, high = (reference["low"], reference["high"]) if reference else (math.nan, math.nan)
    qs = ", ".join(str(q) for q in QUANTILES)
    n, quantiles, below, above = con.execute(
        f'SELECT count("{column}"), quantile_cont("{column}", [{qs}]), '
        f'avg(("{column}" < ?)::DOUBLE), avg(("{column}" > ?)::DOUBLE) FROM fields '
        f'WHERE isfinite("{column}")', [low, high]).fetchone()
    out = {"n": int(n), "quantiles": dict(zip(map(str, QUANTILES), quantiles or [None] * 3))}
    if reference:
        out.update(reference=dict(reference), share_below=below, share_above=above)
    return out


def drift_summary(files: Sequence[str], trust: Mapping | None, *, max_review_rate: float) -> dict:
    """The drift summary of the ok field rows in ``files`` (one run's committed Parquet files)
    against the model card's ``trust`` section (None or {}: no reference, nothing flagged)."""
    con = duckdb.connect()
    if any(f.startswith("s3://") for f in files):
        con.register_filesystem(filesystem(files[0])[0])
    _run_fields(con, files)
    fields, flagged = con.execute(
        "SELECT count(*), count(*) FILTER (needs_review) FROM fields").fetchone()
    reasons = dict(con.execute(
        "SELECT reason, count(*) FROM (SELECT unnest(string_split(review_reason, '; ')) AS reason "
        "FROM fields WHERE needs_review) GROUP BY reason ORDER BY count(*) DESC").fetchall())
    reference = trust_from_card_section(trust).qc_reference if trust else {}  # less stale ranges
    statistics = {name: _statistic(con, name, reference.get(name)) for name in QC_COLUMNS}
    ood = None
    if trust:
        threshold = trust["ood"]["threshold"]
        ood = {**_statistic(con, "ood_score", None), "threshold": threshold,
               "share_above": con.execute("SELECT avg((ood_score > ?)::DOUBLE) FROM fields",
                                          [threshold]).fetchone()[0]}
    rate = flagged / fields if fields else 0.0
    return {"fields": int(fields), "trust_checks": bool(trust), "flagged": int(flagged),
            "flagged_fraction": rate, "max_review_rate": max_review_rate,
            "review_rate_exceeded": bool(trust) and rate > max_review_rate,
            "reasons": reasons, "ood_score": ood, "qc": statistics}


def drift_plot(summary: Mapping) -> bytes:
    """PNG: one panel per QC statistic (and the OOD score), the training range as a grey band
    with its median, this run's 5-95% range as a bar with its median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {**summary["qc"], **({"ood_score": summary["ood_score"]} if summary["ood_score"] else {})}
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 0.75 * len(panels) + 1.2))
    for ax, (name, stat) in zip(axes, panels.items()):
        ref, q = stat.get("reference"), stat["quantiles"]
        if ref:
            ax.axvspan(ref["low"], ref["high"], color="0.85", label="training range")
            ax.axvline(ref["median"], color="0.4", lw=1)
        if "threshold" in stat:
            ax.axvline(stat["threshold"], color="tab:orange", ls="--", label="OOD threshold")
        if q["0.5"] is not None:
            ax.plot([q["0.05"], q["0.95"]], [0, 0], color="tab:blue", lw=4, label="this run 5-95%")
            ax.plot([q["0.5"]], [0], "o", color="tab:red", label="this run median")
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_title(f"{summary['fields']} fields, {summary['flagged_fraction']:.1%} flagged "
                      f"for review (max {summary['max_review_rate']:.1%})", fontsize=9)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    figure.legend(legend.values(), legend.keys(), fontsize=6, loc="lower center", ncols=4)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_drift_summary(run_dir: str, files: Sequence[str], trust: Mapping | None, *,
                        max_review_rate: float) -> dict:
    """Write ``drift.json`` and ``drift.png`` into ``run_dir`` (``<out>/_runs/<run_id>``)."""
    summary = drift_summary(files, trust, max_review_rate=max_review_rate)
    write_bytes(join(run_dir, DRIFT_JSON), json.dumps(summary, indent=2).encode())
    write_bytes(join(run_dir, DRIFT_PNG), drift_plot(summary))
    return summary
