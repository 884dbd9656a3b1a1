"""Run reports: loss curves and a grid of held-out images with their generated captions, as PNG + Markdown.

    python -m blip2_train.demo.report outputs/demo     (what `make demo` calls through run_scripts/demo_summary.py)
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path


def read_csv_metrics(run_dir: Path) -> list[dict]:
    """Rows of a run's CSVLogger file(s), numbers as floats (empty cells dropped)."""
    rows = []
    for f in sorted(Path(run_dir).glob("csv/**/metrics.csv")):
        for r in csv.DictReader(f.open()):
            rows.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["step"], r[key]) for r in rows if key in r and "step" in r)
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(panels: list[tuple[str, list[dict], list[str]]], out: Path) -> Path:
    """panels: (title, rows, keys) -> one PNG with a subplot per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, rows, keys) in zip(axes[0], panels):
        for key in keys:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 12 else None, ms=3, label=key.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def caption_grid(predictions: list[dict], references: dict, image_paths: dict, out: Path, n: int = 12,
                 cols: int = 4) -> Path:
    """Held-out images with the generated caption (bold) and one reference caption under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    preds = predictions[:n]
    rows = (len(preds) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, preds):
        key = str(p["image_id"])
        ax.imshow(Image.open(image_paths[key]).convert("RGB"), interpolation="nearest")
        ref = (references.get(key) or [""])[0]
        ax.set_title("\n".join(textwrap.wrap(p["caption"], 34)), fontsize=8, fontweight="bold")
        ax.text(0.5, -0.04, "\n".join(textwrap.wrap("ref: " + ref, 40)), transform=ax.transAxes, ha="center",
                va="top", fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
