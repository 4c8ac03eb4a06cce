"""`--plot`: loss / accuracy curves and the confusion matrix of a run, as PNG files."""
from __future__ import annotations

import json
from pathlib import Path


def plot_run(run: Path) -> list[Path]:
    """Read <run>/metrics.jsonl and summary.json; write curves.png and confusion_<split>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_accuracy" in r]
    summary = json.loads((run / "summary.json").read_text())
    written = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        ax_acc.plot([r["epoch"] for r in evals], [r["val_accuracy"] for r in evals], "o-", label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    written.append(run / "curves.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    labels = json.loads((run / "hf_config" / "config.json").read_text()).get("id2label", {})
    names = [labels[k] for k in sorted(labels, key=int)] if labels else None
    for split, m in summary.get("eval", {}).items():
        fig = confusion_figure(m["confusion_matrix"], names, f"{split}: accuracy {m['accuracy']:.4f}")
        written.append(run / f"confusion_{split}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def confusion_figure(cm: list[list[int]], names: list[str] | None, title: str):
    """A matplotlib figure of a confusion matrix (rows: true, columns: predicted), counts written in."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4 + 0.4 * len(cm), 3.5 + 0.4 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    ticks = range(len(cm))
    ax.set_xticks(ticks, names or ticks, rotation=30, ha="right")
    ax.set_yticks(ticks, names or ticks)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig
