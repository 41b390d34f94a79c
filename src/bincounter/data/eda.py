"""The exploratory report the seed notebooks drew by hand, as a pipeline output of the split stage.

data/eda/summary.json (DVC metrics), class_counts.csv (DVC plot), class_balance.png,
image_sizes.png and samples.png (a grid of sample photos per count).
"""

from __future__ import annotations

import io
import json
import random
from array import array
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bincounter.config import Config  # noqa: E402
from bincounter.data import shards  # noqa: E402
from bincounter.data.fetch import SHARDS, kept_bins, kept_shards  # noqa: E402

SAMPLE_ROWS = 12  # at most this many counts get a row of samples.png and a tick of class_balance.png


def write_report(config: Config, splits: dict[str, list[str]], labels: dict[str, int], rejects: dict[str, str]):
    eda_dir = Path(config.split.eda_dir)
    eda_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = Path(config.data.raw_dir)
    classes = list(range(config.data.max_count + 1))
    counts = {name: Counter(labels[i] for i in ids) for name, ids in splits.items()}
    widths, heights = _sizes(raw_dir, labels)

    rows = [f"count,{','.join(splits)}"] + [f"{c},{','.join(str(counts[s][c]) for s in splits)}" for c in classes]
    (eda_dir / "class_counts.csv").write_text("\n".join(rows) + "\n")
    summary = {
        "images": len(labels),
        "rejected": len(rejects),
        "per_split": {name: len(ids) for name, ids in splits.items()},
        "per_count": {str(c): sum(counts[s][c] for s in splits) for c in classes},
        "strategy": config.split.strategy,
        **({"group_size": config.split.group_size} if config.split.strategy == "grouped" else {}),
        # the class balance of each split: the share of its bins holding each count
        "per_split_share": {name: {str(c): round(counts[name][c] / max(len(ids), 1), 4) for c in classes}
                            for name, ids in splits.items()},
        "median_width": _median(widths),
        "median_height": _median(heights),
    }
    (eda_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    strategy = config.split.strategy + (f", blocks of {config.split.group_size} ids"
                                        if config.split.strategy == "grouped" else "")
    _plot_class_balance(eda_dir / "class_balance.png", counts, classes, strategy)
    _plot_sizes(eda_dir / "image_sizes.png", widths, heights)
    _plot_samples(eda_dir / "samples.png", labels, raw_dir, classes, seed=config.split.seed)


def _sizes(raw_dir: Path, wanted: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(widths, heights) of the wanted photos as fetch measured them, from the index of each raw shard that
    holds one (no photo is read again); int32 arrays, 8 bytes a bin where tuples took ~70."""
    widths, heights, seen = array("i"), array("i"), set()
    for name, members in kept_shards(raw_dir):
        if name in seen or not any(image_id in wanted for image_id in members):
            continue
        seen.add(name)
        recorded = shards.read_index(raw_dir / SHARDS / name)["bins"]
        for image_id in sorted(recorded):
            if image_id in wanted and recorded[image_id][3]:
                width, height = recorded[image_id][3]
                widths.append(width)
                heights.append(height)
    return np.frombuffer(widths, np.int32), np.frombuffer(heights, np.int32)


def _median(values: np.ndarray) -> float:
    return float(np.median(values)) if len(values) else 0.0


def _plot_class_balance(path: Path, counts: dict[str, Counter], classes: list[int], strategy: str) -> None:
    """The share of each split's bins per count, side by side: a balanced split has bars of equal height."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(counts)
    for k, (name, counter) in enumerate(counts.items()):
        total = max(sum(counter.values()), 1)
        ax.bar([c + (k - 1) * width for c in classes], [counter[c] / total for c in classes], width,
               label=f"{name} ({total})")
    ax.set(xlabel="objects in bin (EXPECTED_QUANTITY)", ylabel="share of the split's bins",
           title=f"Class balance per split ({strategy})")
    if len(classes) <= SAMPLE_ROWS:  # a tick per count; matplotlib's own ticks for a long range
        ax.set_xticks(classes)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sizes(path: Path, widths: np.ndarray, heights: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(widths, heights, s=6, alpha=0.4)
    ax.set(xlabel="width (px)", ylabel="height (px)", title=f"Image sizes (n={len(widths)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_rows(labels: dict[str, int], classes: list[int]) -> dict[int, list[str]]:
    """{count: its bins' ids, sorted} for the rows of samples.png: every count of a small range, or
    SAMPLE_ROWS counts spread over the present ones (a range of 0..1000 would draw 4,000 photos and
    take gigabytes). One pass over the labels."""
    present = sorted(set(labels.values()))
    if len(classes) <= SAMPLE_ROWS:
        shown = classes
    else:
        spread = {round(k * (len(present) - 1) / (SAMPLE_ROWS - 1)) for k in range(SAMPLE_ROWS)} if present else set()
        shown = [present[k] for k in sorted(spread)]
    rows: dict[int, list[str]] = {count: [] for count in shown}
    for image_id, count in labels.items():
        if count in rows:
            rows[count].append(image_id)
    return {count: sorted(ids) for count, ids in rows.items()}


def _plot_samples(path: Path, labels: dict[str, int], raw_dir: Path, classes: list[int], seed: int, per=4):
    rng = random.Random(seed)
    rows = sample_rows(labels, classes)
    chosen = {count: rng.sample(ids, min(per, len(ids))) for count, ids in rows.items()}
    wanted = {image_id for picks in chosen.values() for image_id in picks}
    shard_of = {image_id: shard for image_id, shard in kept_bins(raw_dir) if image_id in wanted}
    fig, axes = plt.subplots(len(rows), per, figsize=(per * 2.2, len(rows) * 2.2), squeeze=False)
    for row, (count, picks) in enumerate(chosen.items()):
        for col in range(per):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(picks):
                photo = shards.read_member(raw_dir / SHARDS / shard_of[picks[col]], f"{picks[col]}.jpg")
                with Image.open(io.BytesIO(photo)) as image:
                    image.draft("RGB", (200, 200))
                    ax.imshow(image.convert("RGB"))
                ax.set_title(f"count {count} · {picks[col]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
