"""The exploratory report the seed notebooks drew by hand, as a pipeline output of the split stage.

data/eda/summary.json (DVC metrics), class_counts.csv (DVC plot), class_balance.png,
image_sizes.png and samples.png (a grid of sample photos per count).
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from bincounter.config import Config  # noqa: E402
from bincounter.data import shards  # noqa: E402
from bincounter.data.fetch import SHARDS, shard_of as fetched_shards  # noqa: E402


def write_report(config: Config, splits: dict[str, list[str]], labels: dict[str, int], rejects: dict[str, str]):
    eda_dir = Path(config.split.eda_dir)
    eda_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = Path(config.data.raw_dir)
    shard_of = fetched_shards(raw_dir)
    classes = list(range(config.data.max_count + 1))
    counts = {name: Counter(labels[i] for i in ids) for name, ids in splits.items()}
    sizes = _sizes(raw_dir, shard_of, set(labels))

    rows = [f"count,{','.join(splits)}"] + [f"{c},{','.join(str(counts[s][c]) for s in splits)}" for c in classes]
    (eda_dir / "class_counts.csv").write_text("\n".join(rows) + "\n")
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]
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
    _plot_samples(eda_dir / "samples.png", labels, raw_dir, shard_of, classes, seed=config.split.seed)


def _sizes(raw_dir: Path, shard_of: dict[str, str], wanted: set[str]) -> list[tuple[int, int]]:
    """Photo sizes as fetch measured them, from each shard's index (no photo is read again)."""
    sizes = []
    for name in sorted({shard_of[i] for i in wanted}):
        recorded = shards.read_index(raw_dir / SHARDS / name)["bins"]
        sizes += [tuple(recorded[i][3]) for i in sorted(recorded) if i in wanted and recorded[i][3]]
    return sizes


def _median(values: list[int]) -> float:
    values = sorted(values)
    if not values:
        return 0.0
    mid = len(values) // 2
    return float(values[mid]) if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


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
    ax.set_xticks(classes)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sizes(path: Path, widths: list[int], heights: list[int]) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(widths, heights, s=6, alpha=0.4)
    ax.set(xlabel="width (px)", ylabel="height (px)", title=f"Image sizes (n={len(widths)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_samples(path: Path, labels: dict[str, int], raw_dir: Path, shard_of: dict[str, str], classes: list[int],
                  seed: int, per=4):
    rng = random.Random(seed)
    fig, axes = plt.subplots(len(classes), per, figsize=(per * 2.2, len(classes) * 2.2), squeeze=False)
    for row, count in enumerate(classes):
        ids = sorted(i for i, c in labels.items() if c == count)
        picks = rng.sample(ids, min(per, len(ids)))
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
