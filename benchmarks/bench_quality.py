"""Counting quality on unseen bins: one bincounter recipe end to end vs the seed-style baseline, same bins.

    python benchmarks/bench_quality.py --sources ../shared/abid-sample /tmp/abid-more \
        --set train.arch=resnet18 --set train.image_size=128 --epochs 5 [--baseline] [--strategy grouped]

The sources are folders in the bucket's layout (abid-sample, and abid-more built as its README says). Their
bins with counts 0-5 are merged (first source wins on a repeated id) into one local source, then bincounter's
own stages run: catalog, fetch (data.source = that folder), split (split.strategy, fixed seed), prepare. The recipe
trains through bincounter.training.run.run_training (the function `bincounter train` runs, calibration,
decode and TTA included; MLflow off) and is scored on the test split with the served model's numerics
(bincounter.training.run.evaluate_split, which tests/test_calibration.py checks against the pyfunc). With
--baseline, the seed notebooks' loop (ImageFolder-style PIL decoding, resnet18, fp32, AdamW, cross-entropy)
trains for the same epochs on the same training bins. One markdown row per contender is printed and
appended to --out, with the machine and the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fetch import cpu_model  # noqa: E402
from bench_train import bootstrap_intervals, macro_and_rmse, percentile_interval, train_baseline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("accuracy", "macro_accuracy", "rmse", "mae", "off_by_one_accuracy", "ece")


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"


def merge_sources(sources: list[Path], dest: Path, limit: int | None) -> list[str]:
    """dest/{bin-images,metadata} as symlinks to every bin with a count 0..5; -> the ids (sorted)."""
    (dest / "bin-images").mkdir(parents=True)
    (dest / "metadata").mkdir(parents=True)
    ids = []
    for source in sources:
        with open(source / "labels.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                image_id = row["image_id"]
                if int(row["expected_quantity"]) > 5 or (dest / "metadata" / f"{image_id}.json").exists():
                    continue
                (dest / "bin-images" / f"{image_id}.jpg").symlink_to((source / "bin-images" / f"{image_id}.jpg").resolve())
                (dest / "metadata" / f"{image_id}.json").symlink_to((source / "metadata" / f"{image_id}.json").resolve())
                ids.append(image_id)
    ids.sort()
    return ids[:limit] if limit else ids


def build(root: Path, args):
    from bincounter.config import build_config
    from bincounter.data.catalog import build_catalog
    from bincounter.data.fetch import fetch
    from bincounter.data.prepare import prepare
    from bincounter.data.split import split

    if not (args.reuse and (root / "manifest.json").is_file()):
        ids = merge_sources([Path(s) for s in args.sources], root / "source", args.limit)
        (root / "manifest.json").write_text(json.dumps(ids))
    overrides = dict(item.split("=", 1) for item in args.set)
    size = int(overrides.get("train.image_size", 128))
    config = build_config({}, {
        "data.source": str(root / "source"), "data.subset": str(root / "manifest.json"),
        "data.raw_dir": str(root / "raw"), "data.workers": 8, "data.catalog": str(root / "catalog.parquet"), "split.out_dir": str(root / "splits"),
        "split.eda_dir": str(root / "eda"), "split.strategy": args.strategy, "split.seed": args.seed,
        "prepare.out_dir": str(root / "prepared"), "prepare.image_size": size + size // 8,
        "prepare.workers": args.workers, "train.data_dir": str(root / "prepared"),
        "train.checkpoint_dir": str(root / "ckpt"), "train.epochs": args.epochs, "train.profile_steps": 0,
        "train.num_workers": 1, "train.patience": max(args.epochs, 1), "train.device": "cpu", **overrides})
    if args.reuse and (root / "prepared" / "meta.json").is_file():
        print(f"reusing the bins fetched, split and prepared in {root}")
        return config
    build_catalog(config.data)
    fetch(config.data)
    split(config)
    prepare(config)
    return config


def training_subset(root: Path, fraction: float, seed: int, group_size: int) -> Path:
    """For a learning curve: a view of root (beside it) whose training split keeps `fraction` of its blocks of
    neighbouring ids, stratified by count (one fold, cut as the split stage cuts val and test); val, test, the
    photos and the prepared shards are root's own, linked. -> the view."""
    from bincounter.config import file_sha256
    from bincounter.data.split import group_of, one_fold, read_split

    view = root.parent / f"{root.name}-train{round(fraction * 100)}"
    if (view / "prepared" / "meta.json").is_file():
        return view
    rows = read_split(root / "splits" / "train.csv")
    fold = one_fold(list(range(len(rows))), [c for _, c in rows], [group_of(i, group_size) for i, _ in rows],
                    fraction, seed, "training subset")
    kept = {rows[k][0] for k in fold}
    view.mkdir(parents=True, exist_ok=True)
    for name in ("source", "raw", "catalog.parquet", "manifest.json", "eda"):
        (view / name).symlink_to((root / name).resolve())
    (view / "splits").mkdir()
    for name in ("val", "test", "rejects"):
        shutil.copy(root / "splits" / f"{name}.csv", view / "splits")
    keep_rows(root / "splits" / "train.csv", view / "splits" / "train.csv", kept)
    (view / "prepared" / "train").mkdir(parents=True)
    for name in ("val", "test"):
        (view / "prepared" / name).symlink_to((root / "prepared" / name).resolve())
    for shard in (root / "prepared" / "train").glob("*.tar"):
        (view / "prepared" / "train" / shard.name).symlink_to(shard.resolve())
    keep_rows(root / "prepared" / "train" / "labels.csv", view / "prepared" / "train" / "labels.csv", kept)
    record = json.loads((root / "prepared" / "train" / "prepared.json").read_text())
    record.update(rows=len(kept), split_csv_sha256=file_sha256(view / "splits" / "train.csv"))
    (view / "prepared" / "train" / "prepared.json").write_text(json.dumps(record))
    shutil.copy(root / "prepared" / "meta.json", view / "prepared")  # last: it marks the view complete
    return view


def keep_rows(source: Path, dest: Path, ids: set[str]) -> None:
    """Copy a CSV with an image_id column, keeping the header and the rows of these ids."""
    with open(source, newline="") as src, open(dest, "w", newline="") as out:
        reader = csv.reader(src)
        writer = csv.writer(out)
        writer.writerow(next(reader))
        writer.writerows(r for r in reader if r[0] in ids)


def run_recipe(config, root: Path, score_only: bool = False, score_device: str = "cpu") -> tuple[dict, float, int]:
    """Train the recipe (or, score_only, take the model root/model already holds); -> ({decode: test
    metrics}, seconds, best epoch). One trained model is scored with each decode rule (argmax, expected,
    thresholds fitted on validation, median), with and without flip TTA, the configured setting first."""
    import torch

    from bincounter.config import DECODES
    from bincounter.model import decode_counts, load_model_dir
    from bincounter.training.calibration import expected_calibration_error
    from bincounter.training.metrics import counting_metrics
    from bincounter.training.run import METRICS_FILE, data_dirs_for, evaluate_split, run_training

    t0 = time.perf_counter()
    if not score_only:
        run_training(config, data_dirs_for(config), track=False, register=False, model_dir=root / "model")
    seconds = time.perf_counter() - t0
    best_epoch = json.loads((root / "model" / METRICS_FILE).read_text())["best_epoch"]
    model, model_config = load_model_dir(root / "model")
    trained_tta = bool(model_config.get("tta", False))
    scored = {}
    for tta in (trained_tta, not trained_tta):
        settings = dict(model_config, tta=tta)
        test = evaluate_split(model, root / "prepared" / "test", settings, torch.device(score_device))
        probs, targets = test["probabilities"], test["targets"]
        for how in dict.fromkeys((config.train.decode, *DECODES)):
            counts = decode_counts(probs, how, model_config.get("decode_cuts"))
            scored[tta, how] = counting_metrics(targets, counts, probs.shape[1]) | bootstrap_intervals(targets, counts)
            scored[tta, how]["ece"] = expected_calibration_error(probs, targets, counts)
            scored[tta, how]["predictions"] = dict(zip(test["ids"], counts.tolist()))
            scored[tta, how]["targets"] = dict(zip(test["ids"], targets.tolist()))
    return scored, seconds, int(best_epoch)


def versus_baseline(recipe: dict, baseline: dict) -> str:
    """The recipe minus the seed-style loop on the same test bins, as 95% intervals of a paired bootstrap:
    both models are scored on each resample, so the test split's own luck cancels out."""
    import numpy as np

    ids = sorted(recipe["predictions"])
    if ids != sorted(baseline["predictions"]):
        raise SystemExit("the recipe and the baseline were not scored on the same test bins")
    true, ours, theirs = (np.array([table[i] for i in ids]) for table in
                          (recipe["targets"], recipe["predictions"], baseline["predictions"]))

    def statistic(t, a, b):
        (macro_a, rmse_a), (macro_b, rmse_b) = macro_and_rmse(t, a), macro_and_rmse(t, b)
        return macro_a - macro_b, rmse_a / rmse_b

    point = statistic(true, ours, theirs)
    low, high = percentile_interval(statistic, true, ours, theirs)
    return (f"macro accuracy {point[0]:+.3f} (95% {low[0]:+.3f} to {high[0]:+.3f}), RMSE ratio "
            f"{point[1]:.3f} (95% {low[1]:.3f} to {high[1]:.3f})")


def row(name: str, metrics: dict, seconds: float, best_epoch: int, epochs: int) -> str:
    cells = [f"{metrics.get(k, float('nan')):.3f}" for k in KEYS]
    per_count = " / ".join(f"{metrics.get(f'class_{c}_accuracy', float('nan')):.2f}" for c in range(6))
    spread = " | ".join("{:.3f}-{:.3f}".format(*metrics[k]) for k in ("macro_ci", "rmse_ci"))
    return (f"| {name} | " + " | ".join(cells) + f" | {per_count} | {best_epoch}/{epochs} | {seconds:.0f} | "
            f"{spread} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", nargs="+", default=[str(REPO / ".." / "shared" / "abid-sample")])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe knob (params key)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--strategy", default="grouped", help="split.strategy: grouped | random")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--limit", type=int, default=None, help="use the first N merged bins (sorted ids)")
    parser.add_argument("--workers", type=int, default=2, help="prepare processes")
    parser.add_argument("--baseline", action="store_true", help="also train the seed-style loop on the same bins")
    parser.add_argument("--baseline-size", type=int, default=None, metavar="PX",
                        help="the seed-style loop's input size (default: the recipe's train.image_size)")
    parser.add_argument("--name", default=None, help="the row's name (default: the recipe)")
    parser.add_argument("--reuse", default=None, metavar="DIR",
                        help="keep the merged, split and prepared bins in DIR and reuse them on the next run "
                             "(same sources, strategy and image size); default: a temporary folder")
    parser.add_argument("--train-fraction", type=float, default=1.0, metavar="F",
                        help="learning curve: train on this fraction (0.5, 0.25, ...) of the training split's id "
                             "blocks, stratified by count; val and test unchanged (needs --reuse)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the model a previous run left in --reuse DIR again, without training "
                             "(its seconds column is then the scoring time)")
    parser.add_argument("--score-device", default="cpu", choices=("cpu", "cuda"),
                        help="where the test split is scored (cpu: the numerics of the 2-core rows; cuda: faster "
                             "for large inputs on a GPU machine)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "quality-results.md"))
    args = parser.parse_args()

    import torch

    from bincounter import tracking
    from bincounter.training.loop import select_device

    if args.train_fraction != 1.0 and not (args.reuse and 0 < args.train_fraction < 1):
        parser.error("--train-fraction: a fraction between 0 and 1, with --reuse")
    if args.score_device == "cuda" and not torch.cuda.is_available():
        parser.error("--score-device cuda: no CUDA device here")  # before training, not after it
    command = "python benchmarks/bench_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.reuse or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if args.train_fraction != 1.0:  # the whole set first (built once), then the view that trains on part
            whole = build(root, args)
            root = training_subset(root, args.train_fraction, args.seed, whole.split.group_size)
        if args.score_only and not (root / "model").is_dir():
            parser.error(f"--score-only: {root / 'model'} holds no trained model")
        for stale in () if args.score_only else ("model", "ckpt"):
            shutil.rmtree(root / stale, ignore_errors=True)
        config = build(root, args)
        sizes = {n: len((root / "splits" / f"{n}.csv").read_text().splitlines()) - 1 for n in ("train", "val", "test")}
        part = f", {sizes['train']} training bins" if args.train_fraction != 1.0 else ""
        name = args.name or f"{tracking.recipe_name(config)} ({args.strategy}{part})"
        scored, seconds, best = run_recipe(config, root, args.score_only, args.score_device)
        for (tta, how), metrics in scored.items():
            label = name if (tta, how) == (config.train.tta, config.train.decode) else \
                f"same model, {'flip TTA, ' if tta else ''}decode={how}"
            lines.append(row(label, metrics, seconds, best, args.epochs))
            print(lines[-1], flush=True)
        if args.baseline:
            torch.manual_seed(config.train.seed)
            size = args.baseline_size or config.train.image_size
            base, seconds, best = train_baseline(root, args.epochs, size, 32)
            at = f", {size} px" if size != config.train.image_size else ""
            lines.append(row(f"seed-style baseline ({args.strategy}{part}{at})", base, seconds, best, args.epochs))
            print(lines[-1], flush=True)
            paired = [f"\nPaired over the {sizes['test']} test bins, the recipe (no TTA) minus the seed-style loop:"]
            paired += [f"- decode={how}: {versus_baseline(scored[False, how], base)}" for tta, how in scored if not tta]
            print("\n".join(paired), flush=True)
            lines += paired
    device = select_device(config.train.device)  # what run_training chose: train.device auto picks a GPU too
    trained_on = f" | trained on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    header = (f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} | {machine()}{trained_on} | torch {torch.__version__} | "
              f"bins train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']} | `{command}` -->\n")
    with open(args.out, "a") as handle:
        handle.write(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
