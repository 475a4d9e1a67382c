"""Needle-in-a-haystack heatmaps: passkey accuracy per needle depth (rows) × context length (columns)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot loads


def plot_heatmap(title: str, contexts: list[int], depths: list[float], accuracy: list[list[float]],
                 path: Path) -> None:
    """accuracy[i][j]: depth i, context j, in [0, 1]."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(contexts), 1.0 + 0.55 * len(depths)))
    image = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="passkey accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
