"""A self-contained HTML evaluation report with plots, and a scoring run's report page.

The report is built only from the JSON-ready dict of ``allcore.evaluation.metrics.classification_report``
(plus optional training history, noise table and model card), so it can be regenerated later
from a saved ``metrics.json`` without the model or the images. Plots are written as PNG files
next to ``report.html`` and also embedded in it (base64), so the HTML can be mailed on its own.
"""

from __future__ import annotations

import base64
import html
import json
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg headless

SMALL_SUPPORT = 30  # below this many test images a class's figures swing by several points

HEADLINE = [  # (metrics key, label, key of its 95% CI or None)
    ("accuracy", "Accuracy", "accuracy_ci95"),
    ("f1_macro", "Macro F1", "macro_f1_ci95"),
    ("precision_macro", "Macro precision", None),
    ("recall_macro", "Macro recall", None),
    ("f2_macro", "Macro F2", None),
    ("f1_weighted", "Weighted F1", None),
    ("cohen_kappa", "Cohen's kappa", None),
    ("mcc", "MCC", None),
    ("roc_auc_macro", "ROC-AUC (macro, one-vs-rest)", None),
    ("ece", "Expected calibration error", None),
]

CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: .6em 1em; }
.figures img { max-width: 100%; margin: .5em 0; border: 1px solid #eee; }
.slide img { max-width: 100%; border: 1px solid #eee; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _esc(value: Any) -> str:
    return html.escape(_fmt(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


# ----------------------------------------------------------------------------- figures

def _training_curves(history: list[dict]) -> Figure:
    fig = Figure(figsize=(13, 3.6))
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_acc", "val_acc"),
              ("macro F1", "train_macro_f1", "val_macro_f1")]
    epochs = [row["epoch"] for row in history]
    for ax, (name, *keys) in zip(fig.subplots(1, 3), panels):
        for key in keys:
            if any(row.get(key) is not None for row in history):
                ax.plot(epochs, [row.get(key, np.nan) for row in history], marker=".",
                        label=key.split("_")[0])
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def _confusion_matrix(metrics: dict) -> Figure:
    names, counts = metrics["class_names"], np.asarray(metrics["confusion_matrix"], dtype=float)
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 1.1 * len(names)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(counts.shape):
        ax.text(j, i, f"{int(counts[i, j])}\n{100 * row_share[i, j]:.1f}%", ha="center",
                va="center", color="white" if row_share[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (count, % of true class)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _curves(metrics: dict, kind: str) -> Figure:
    fig = Figure(figsize=(5.5, 4.6))
    ax = fig.subplots()
    for name, curve in metrics["curves"][kind].items():
        if kind == "roc":
            auc = metrics["per_class"][name]["roc_auc"]
            ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {_fmt(auc)})")
        else:
            ax.step(curve["recall"], curve["precision"], where="post", label=name)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title="ROC, one-vs-rest")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="precision-recall, one-vs-rest")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _noise_robustness(noise_table: list[dict]) -> Figure:
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    sigmas = [row["sigma"] for row in noise_table]
    for key in ("accuracy", "f1_macro", "roc_auc_macro"):
        ax.plot(sigmas, [np.nan if row[key] is None else row[key] for row in noise_table],
                marker="o", label=key)
    ax.set(xlabel="Gaussian noise sigma (0-255 pixel units)", ylabel="score",
           title="robustness to pixel noise")
    ax.legend()
    fig.tight_layout()
    return fig


def _draw_reliability(ax, bins: dict, title: str) -> None:
    edges = np.asarray(bins["edges"])
    accuracy = [np.nan if a is None else a for a in bins["accuracy"]]
    ax.bar(edges[:-1], accuracy, width=np.diff(edges), align="edge", edgecolor="black",
           alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1),
           ylim=(0, 1), title=title)
    ax.legend(loc="upper left")


def _reliability(metrics: dict) -> Figure:
    fig = Figure(figsize=(5, 4.6))
    _draw_reliability(fig.subplots(), metrics["calibration"],
                      f"reliability diagram (ECE {_fmt(metrics['ece'])})")
    fig.tight_layout()
    return fig


def _reliability_temperature(trust: dict) -> Figure:
    fig = Figure(figsize=(10, 4.6))
    before, after = fig.subplots(1, 2)
    _draw_reliability(before, trust["calibration_before"],
                      f"before temperature scaling (ECE {_fmt(trust['ece_before'])})")
    _draw_reliability(after, trust["calibration_after"],
                      f"after, T = {trust['temperature']:.2f} (ECE {_fmt(trust['ece_after'])})")
    fig.tight_layout()
    return fig


def _ood_histogram(trust: dict) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    scores = np.asarray(trust["ood_scores"], dtype=float)
    ax.hist(scores, bins=40, alpha=0.8, label=f"evaluated images (n={len(scores)})")
    ax.axvline(trust["ood_threshold"], color="red", linestyle="--", label="review threshold")
    ax.set(xlabel=f"OOD score ({trust['ood_method']}; higher = further from training data)",
           ylabel="images", title="out-of-distribution scores")
    ax.legend()
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- html sections

def _headline(metrics: dict) -> str:
    rows = []
    for key, label, ci_key in HEADLINE:
        ci = metrics.get(ci_key) if ci_key else None
        rows.append([label, metrics.get(key), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""])
    return _table(["metric", "value", "95% bootstrap CI"], rows)


def _per_class(metrics: dict) -> str:
    rows = [[name, c["precision"], c["recall"], c["f1"], c["f2"], c["roc_auc"], c["support"]]
            for name, c in metrics["per_class"].items()]
    table = _table(["class", "precision", "recall", "F1", "F2", "ROC-AUC", "support"], rows)
    small = [f"{name} ({c['support']})" for name, c in metrics["per_class"].items()
             if c["support"] < SMALL_SUPPORT]
    if small:
        table += (f"<p class='note'>Few test images for {_esc(', '.join(small))} (fewer than "
                  f"{SMALL_SUPPORT}): one image more or less right moves these per-class figures "
                  "by several points; read them with the confidence intervals above and prefer "
                  "k-fold results.</p>")
    return table


def _model_card(card: dict) -> str:
    def show(value: Any) -> str:
        if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
            return ", ".join(map(str, value))
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, sort_keys=True, default=str)
            return text if len(text) <= 400 else text[:400] + " …"
        return _fmt(value)
    return _table(["field", "value"], [[key, show(value)] for key, value in card.items()])


def _trust_section(trust: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(trust["review_reasons"].items(),
                                                       key=lambda kv: -kv[1])) or "none"
    return _table(["", "value"], [
        ["temperature (fitted on validation)", trust["temperature"]],
        ["ECE before / after temperature scaling", f"{_fmt(trust['ece_before'])} / {_fmt(trust['ece_after'])}"],
        ["OOD method / threshold", f"{trust['ood_method']} / {_fmt(trust['ood_threshold'])}"],
        ["share of images flagged for review", trust["flag_rate"]],
        ["accuracy of unflagged / flagged images",
         f"{_fmt(trust['accuracy_unflagged'])} / {_fmt(trust['accuracy_flagged'])}"],
        ["review reasons (images)", reasons],
    ])


def _shortcut_section(shortcut: dict) -> str:
    trained = "masked" if shortcut["trained_with_corner_masked"] else "visible"
    return (_table(["scale-bar corner at evaluation", "accuracy"],
                   [["masked", shortcut["accuracy_corner_masked"]],
                    ["visible", shortcut["accuracy_corner_visible"]]])
            + f"<p>The model was trained with the corner {trained}. In Taleqani fields the "
              "scale-bar label's colour differs by class: a model trained on it loses accuracy "
              "when it is masked, and its calls on images from elsewhere follow the label, "
              "not the cells.</p>")


def write_report(out_dir: str | Path, metrics: dict, *, history: list[dict] | None = None,
                 noise_table: list[dict] | None = None, title: str,
                 model_card: dict | None = None, shortcut: dict | None = None,
                 trust: dict | None = None) -> Path:
    """Write the PNG plots and ``report.html`` into ``out_dir``; return the HTML path.

    ``metrics`` is the dict of ``allcore.evaluation.metrics.classification_report`` (writing it as
    ``metrics.json`` is the caller's job). ``history`` rows hold ``epoch, train_loss,
    train_acc, val_loss, val_acc, val_macro_f1, lr``; ``noise_table`` rows come from
    ``allcore.evaluation.metrics.noise_robustness_table``; ``shortcut`` and ``trust`` are the
    ``corner_shortcut`` and ``trust`` entries of ``allcore.evaluation.evaluate``'s metrics.json.
    """
    needed = {"class_names", "per_class", "confusion_matrix", "curves", "calibration"}
    missing = needed - set(metrics)
    if missing:
        raise ValueError(f"metrics lacks {sorted(missing)}; pass the dict returned by "
                         "allcore.evaluation.metrics.classification_report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "training_curves": _training_curves(history) if history else None,
        "confusion_matrix": _confusion_matrix(metrics),
        "roc_curves": _curves(metrics, "roc"),
        "pr_curves": _curves(metrics, "pr"),
        "noise_robustness": _noise_robustness(noise_table) if noise_table else None,
        "reliability": _reliability(metrics),
        "reliability_temperature": _reliability_temperature(trust) if trust else None,
        "ood_scores": _ood_histogram(trust) if trust else None,
    }
    images = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        images.append(f"<img alt='{_esc(name)}' src='data:image/png;base64,{encoded}'>")

    sections = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_esc(metrics.get('n'))} test images; classes: "
        f"{_esc(', '.join(metrics['class_names']))}.</p>",
        "<h2>Headline metrics</h2>", _headline(metrics),
        "<h2>Per class</h2>", _per_class(metrics),
    ]
    if noise_table:
        keys = ["sigma", "accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc_macro"]
        sections += ["<h2>Robustness to Gaussian pixel noise</h2>",
                     _table(keys, [[row.get(k) for k in keys] for row in noise_table])]
    if shortcut:
        sections += ["<h2>Scale-bar shortcut</h2>", _shortcut_section(shortcut)]
    if trust:
        sections += ["<h2>How far to trust the predictions</h2>", _trust_section(trust)]
    if model_card:
        sections += ["<h2>Model card</h2>", _model_card(model_card)]
    sections += ["<h2>Figures</h2>", f"<div class='figures'>{''.join(images)}</div>"]
    html_path = out / "report.html"
    html_path.write_text(_page(title, sections), encoding="utf-8")
    return html_path


# ----------------------------------------------------------------------------- scoring runs

RUN_FACTS = [  # (RunSummary.to_dict() key, label)
    ("listed", "inputs listed"), ("ok", "scored ok"), ("errors", "error rows"),
    ("skipped", "skipped (already scored by these weights)"), ("balanced", "balanced"),
    ("cells", "cell rows"), ("flagged", "flagged for review"), ("failed", "failed its checks"),
    ("seconds", "seconds"),
]


def run_report_html(run: dict, slides: Sequence, *, root_href: str) -> str:
    """A scoring run's report page: its accounting and, per slide it scored, the slide's overview
    (the thumbnail with a dot per cell coloured by its call) linked to the slide's QuPath GeoJSON.

    ``run`` is ``RunSummary.to_dict()``; ``slides`` are ``allcore.scoring.tiles.ScoredSlide``;
    ``root_href`` is the output root relative to the page. The overviews are linked, not
    embedded as the evaluation report's figures are: a nightly run may score hundreds of slides,
    and the page stays readable wherever the output folder is copied whole.
    """
    def href(path: str) -> str:
        return html.escape(f"{root_href}/{urllib.parse.quote(path)}", quote=True)

    title = f"Scoring run {run['run_id']}"
    sections = [f"<h1>{_esc(title)}</h1>", f"<p>Output: {_esc(run['output'])}</p>",
                _table(["", "value"], [[label, run.get(key)] for key, label in RUN_FACTS])]
    if slides:
        sections += ["<h2>Slides</h2>",
                     "<p>Each cell a dot at its centroid: red blast, green not blast, yellow "
                     "abstain (needs a person). Click an overview for the slide's cells as a "
                     "GeoJSON QuPath imports.</p>"]
        for slide in slides:
            sections.append(
                f"<figure class='slide'><a href='{href(slide.geojson)}'><img src='{href(slide.overview)}' "
                f"alt='overview of {_esc(slide.slide_id)}'></a><figcaption>{_esc(slide.slide_id)}: "
                f"{_esc(slide.cells)} cells, {_esc(slide.blast)} called blast, {_esc(slide.abstain)} "
                f"abstained; <a href='{href(slide.geojson)}'>GeoJSON (QuPath)</a></figcaption></figure>")
    return _page(title, sections)
