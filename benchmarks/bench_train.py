"""Training throughput (images/s for the full step: data + forward + backward + optimizer) and peak RSS,
bincounter's pipeline vs a seed-notebook-style baseline, same model / batch / steps, torch CPU.

    python benchmarks/bench_train.py [--sample ../shared/abid-sample] [--archs resnet18 resnet50]
                                     [--batch-size 16] [--steps 8 4] [--num-workers 0] [--precision auto]

bincounter: bincounter.training.loop.train_one_epoch itself, fed the way `bincounter train` feeds it on a CPU:
            ShardDataset over the prepared tar shards of 256 px JPEGs (prepare's output), one pread per photo
            + torchvision decode_jpeg + train_transform(224, train.augment) in the DataLoader workers (the main
            process with --num-workers 0), so the step includes the JPEG decode: that is the real pipeline,
            since prepared data are compressed JPEGs, not raw pixels. Then BinCounterNet (normalises inside,
            channels_last) + count_loss (CE + EMD), AdamW, and train.precision (auto: bf16 autocast on CPUs
            with AMX/AVX512-BF16).
baseline:   ImageFolder-like dataset that opens each original JPEG (the sample folder's bin-images/, full
            size) with PIL every epoch, Resize(224) + RandomCrop(224) + ToTensor + Normalize per sample, a plain
            torchvision model (same architecture, 6-way head) in fp32, CE loss, AdamW.
Both train on the same bins: the sample's first --n ids with counts 0-5, through bincounter's catalog, fetch,
split and prepare stages, then the train split. Each (arch, pipeline) runs in its own subprocess, so
ru_maxrss is that configuration's own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prepare import DEFAULT_SAMPLE, build_splits, sample_ids  # noqa: E402

SOURCE = "source"  # root/source: the bins' folder in the bucket layout (bench_quality merges its sources there)
EXTRACTED = "baseline-images"  # root/baseline-images: the photos taken out of fetch's raw shards, as a fallback


def link_source(root: Path, sample: Path) -> None:
    """root/source -> the sample folder, so the baseline reads the original JPEGs as the seed notebooks did."""
    (root / SOURCE).symlink_to(sample.resolve(), target_is_directory=True)


def baseline_images(root: Path, ids: list[str]) -> Path:
    """The folder of <id>.jpg photos the seed-style baseline reads, for a root built by bincounter's stages:
    root/source/bin-images when it holds every id's photo (bench_quality merges its sources there as symlinks;
    this benchmark links root/source to --sample); else, since fetch keeps photos only inside its tar shards,
    root/baseline-images, extracted once (untimed) from root/raw/shards: the same bytes the bucket served."""
    from bincounter.data import shards
    from bincounter.data.fetch import SHARDS

    source = root / SOURCE / "bin-images"
    if source.is_dir() and all((source / f"{i}.jpg").is_file() for i in ids):
        return source
    folder = root / EXTRACTED
    if folder.is_dir() and all((folder / f"{i}.jpg").is_file() for i in ids):
        return folder
    raw = root / "raw" / SHARDS
    print(f"baseline: photos not all in {source}; extracting them from {raw} into {folder}", flush=True)
    tmp = root / f".{EXTRACTED}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    wanted = {f"{i}.jpg" for i in ids}
    for path in shards.shards_in(raw):
        for name, data in shards.iter_members(path, wanted):
            (tmp / name).write_bytes(data)
    missing = sorted(wanted - {p.name for p in tmp.iterdir()})
    if missing:
        sys.exit(f"baseline: {len(missing)} photos (e.g. {missing[0]}) are neither in {source} nor in {raw}")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def jpeg_folder(root: Path, rows, size: int, train: bool):
    """What torchvision's ImageFolder does in the seed notebooks: PIL open + transform per sample, every epoch."""
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms as T

    crop = [T.RandomCrop(size), T.RandomHorizontalFlip()] if train else [T.CenterCrop(size)]
    transform = T.Compose([T.Resize(size), *crop, T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    class JpegFolder(Dataset):
        items = [(root / f"{i}.jpg", c) for i, c in rows]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, k):
            path, count = self.items[k]
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
            return transform(image), count

    return JpegFolder()


class Stamped:
    """Wraps a loader and notes when each batch arrives: the gaps are whole steps (data + compute)."""

    def __init__(self, loader):
        self.loader, self.stamps = loader, []

    @property
    def dataset(self):  # train_one_epoch asks the loader's dataset how a batch goes to the device
        return self.loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())


def bincounter_steps(args, steps: int) -> tuple[list[float], float, str]:
    """bincounter's own training step: training.loop.train_one_epoch over ShardDataset (JPEG decode + augment in
    the loader), with the model, loss, optimizer and train.precision exactly as `bincounter train` uses them.
    -> (step seconds, data share, precision)."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from bincounter.config import TrainConfig
    from bincounter.training.dataset import ShardDataset, train_transform
    from bincounter.model import build_model
    from bincounter.training.profiling import RunHistory
    from bincounter.training.loop import autocast_dtype, build_optimizer, train_one_epoch
    from bincounter.training.loss import make_loss

    cfg = TrainConfig(arch=args.arch, image_size=224, batch_size=args.batch_size, precision=args.precision,
                      num_workers=args.num_workers, epochs=1)
    # on_device=False: decoded in the loader (CPU). Wrapped in a Subset, which has no batch_to, so the loop
    # moves each decoded batch with .to(device): what ShardDataset.batch_to does for CPU decode.
    shards = ShardDataset(Path(args.root) / "prepared" / "train", train_transform(224, cfg.augment))
    dataset = Subset(shards, range(args.batch_size * (steps + 1)))
    loader = Stamped(DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                drop_last=True, collate_fn=shards.collate))
    model = build_model(args.arch, 6)  # BinCounterNet: channels_last, normalises uint8 inside
    history = RunHistory()
    amp_dtype = autocast_dtype(cfg.precision, torch.device("cpu"))
    train_one_epoch(model, loader, build_optimizer(model, cfg), make_loss(cfg.loss, cfg.emd_weight),
                    torch.device("cpu"), history, amp_dtype=amp_dtype, show_progress=False)
    gaps = [b - a for a, b in zip(loader.stamps, loader.stamps[1:])][1:]  # the first step is the warm-up
    share = history.data_seconds / (history.data_seconds + history.compute_seconds)
    precision = "bf16" if amp_dtype else "fp32"
    return gaps, share, precision


def baseline_steps(args, steps: int) -> tuple[list[float], float, str]:
    """The seed notebooks' step: ImageFolder-style JPEG decode + resize per sample, a plain torchvision
    model in fp32 and NCHW, cross-entropy, AdamW."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from bincounter.data.split import read_split

    rows = read_split(Path(args.root) / "splits" / "train.csv")
    root = Path(args.root)
    dataset = jpeg_folder(baseline_images(root, [i for i, _ in rows]), rows, 224, train=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        drop_last=True)
    net = torchvision.models.get_model(args.arch, weights=None, num_classes=6)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    it = iter(loader)
    gaps, data = [], 0.0
    for step in range(1 + steps):  # step 0 is the warm-up
        t0 = time.perf_counter()
        images, counts = next(it)
        t_data = time.perf_counter() - t0
        loss = torch.nn.functional.cross_entropy(net(images), counts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            gaps.append(time.perf_counter() - t0)
            data += t_data
    return gaps, data / sum(gaps), "fp32"


def one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.steps[0]
    gaps, data_share, precision = (bincounter_steps if args.pipeline == "bincounter" else baseline_steps)(args, steps)
    ordered = sorted(gaps)
    return {"arch": args.arch, "pipeline": args.pipeline, "steps": len(gaps), "precision": precision,
            "best_step_images_per_s": args.batch_size / ordered[0],
            "median_step_images_per_s": args.batch_size / ordered[len(ordered) // 2],
            "images_per_s": len(gaps) * args.batch_size / sum(gaps), "data_share": data_share,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def train_baseline(root: Path, epochs: int, size: int, batch_size: int) -> tuple[dict, float, int]:
    """The seed notebooks' training: JPEG folder, plain resnet18, fp32, cross-entropy, AdamW, no class
    weighting; the epoch with the best validation macro accuracy is kept (the same rule as bincounter's).
    root: a folder built by bincounter's stages (splits/ and raw/shards/); the photos are read from
    root/source/bin-images when it holds them all, else extracted from the raw shards (see baseline_images)."""
    import copy

    import numpy as np
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    from bincounter.training.metrics import counting_metrics
    from bincounter.data.split import read_split

    root = Path(root)
    rows = {name: read_split(root / "splits" / f"{name}.csv") for name in ("train", "val", "test")}
    images = baseline_images(root, [i for split in rows.values() for i, _ in split])
    loaders = {name: DataLoader(jpeg_folder(images, rows[name], size, name == "train"),
                                batch_size=batch_size, shuffle=name == "train", num_workers=1)
               for name in ("train", "val", "test")}
    net = torchvision.models.get_model("resnet18", weights=None, num_classes=6)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def predictions(name: str) -> tuple[np.ndarray, np.ndarray]:
        net.eval()
        with torch.no_grad():
            pairs = [(net(x).argmax(1).numpy(), y.numpy()) for x, y in loaders[name]]
        return np.concatenate([p for p, _ in pairs]), np.concatenate([y for _, y in pairs])

    best, best_state, best_epoch, t0 = -1.0, None, 0, time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for x, y in loaders["train"]:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        predicted, true = predictions("val")
        score = counting_metrics(true, predicted, 6)["macro_accuracy"]
        if score > best:
            best, best_state, best_epoch = score, copy.deepcopy(net.state_dict()), epoch + 1
    seconds = time.perf_counter() - t0
    net.load_state_dict(best_state)
    predicted, true = predictions("test")
    by_id = dict(zip((image_id for image_id, _ in rows["test"]), predicted.tolist()))  # the loader keeps CSV order
    metrics = counting_metrics(true, predicted, 6) | bootstrap_intervals(true, predicted)
    return metrics | {"predictions": by_id}, seconds, best_epoch


def macro_and_rmse(true, predicted):
    from bincounter.training.metrics import counting_metrics

    metrics = counting_metrics(true, predicted, 6)
    return metrics["macro_accuracy"], metrics["rmse"]


def percentile_interval(statistic, *columns, resamples: int = 1000):
    """95% percentile-bootstrap interval of statistic(*columns), the test bins resampled with replacement
    and the columns kept paired bin by bin (scipy's bootstrap). -> (lows, highs), one per output."""
    import numpy as np
    from scipy.stats import bootstrap

    ci = bootstrap(tuple(np.asarray(c) for c in columns), lambda *c: np.array(statistic(*c)), paired=True,
                   vectorized=False, n_resamples=resamples, method="percentile", random_state=0).confidence_interval
    return ci.low, ci.high


def bootstrap_intervals(true, predicted) -> dict[str, tuple[float, float]]:
    """95% intervals of macro accuracy and RMSE over the test bins: how much one test split of this size can
    move a figure, with the model fixed. The spread between training seeds is not in it."""
    low, high = percentile_interval(macro_and_rmse, true, predicted)
    return {"macro_ci": (low[0], high[0]), "rmse_ci": (low[1], high[1])}


def accuracy(args) -> None:
    """bincounter (emd and ce losses) and the seed-style baseline, trained for the same epochs on the same
    split of the sample, at the same image size; test metrics side by side."""
    import torch

    from bincounter.config import with_overrides
    from bincounter.data.prepare import prepare
    from bincounter.training.loop import fit
    from bincounter.training.run import evaluate_split

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build_splits(root, Path(args.sample), sample_ids(Path(args.sample), args.n))
        link_source(root, Path(args.sample))
        config = with_overrides(config, {
            "prepare.image_size": args.size + args.size // 8, "prepare.workers": 2, "train.arch": "resnet18",
            "train.image_size": args.size, "train.epochs": args.epochs, "train.batch_size": 32,
            "train.num_workers": 1, "train.lr": 0.001, "train.precision": args.precision,
            "train.data_dir": str(root / "prepared"), "train.checkpoint_dir": str(root / "ckpt"),
            "train.device": "cpu", "train.patience": 100, "train.profile_steps": 0})
        prepare(config)
        dirs = {name: root / "prepared" / name for name in ("train", "val", "test")}
        sizes = {name: len((root / "splits" / f"{name}.csv").read_text().splitlines()) - 1 for name in dirs}
        print(f"split of {args.n} sample images (counts 0-5): {sizes}", flush=True)
        for loss in args.losses:
            t0 = time.perf_counter()
            result = fit(with_overrides(config, {"train.loss": loss}), dirs)
            seconds = time.perf_counter() - t0
            test = evaluate_split(result.model, dirs["test"], result.model_config, torch.device("cpu"))["metrics"]
            rows.append((f"bincounter {loss} {result.precision}", test, seconds, result.best_epoch))
            print(rows[-1], flush=True)
        if not args.skip_baseline:
            rows.append(("baseline ce fp32", *train_baseline(root, args.epochs, args.size, 32)))
            print(rows[-1], flush=True)
    print(f"\nresnet18 from scratch, {args.size} px, {args.epochs} epochs, batch 32, AdamW 1e-3, "
          f"{args.threads} threads; test split")
    print(f"{'contender':24s} {'accuracy':>8s} {'rmse':>6s} {'mae':>6s} {'macro':>6s} {'off-by-1':>8s} "
          f"{'seconds':>7s} {'best epoch':>10s}")
    for name, m, seconds, best_epoch in rows:
        print(f"{name:24s} {m['accuracy']:8.4f} {m['rmse']:6.3f} {m['mae']:6.3f} {m['macro_accuracy']:6.3f} "
              f"{m['off_by_one_accuracy']:8.3f} {seconds:7.0f} {best_epoch:10d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=DEFAULT_SAMPLE)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 4], help="timed steps per arch (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, same for both pipelines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="bincounter's train.precision: auto | bf16 | fp32")
    parser.add_argument("--repeats", type=int, default=1, help="run each pipeline this many times, interleaved")
    parser.add_argument("--n", type=int, default=320, help="sample images to fetch/split/prepare")
    # internal: run one configuration
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: train bincounter (each of --losses) and the baseline (resnet18, --size px) on a "
                             "split of --n count 0-5 images for --epochs each and compare test metrics")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="with --accuracy: training image size")
    parser.add_argument("--losses", nargs="+", default=["emd", "ce"], help="with --accuracy: bincounter losses")
    parser.add_argument("--skip-baseline", action="store_true", help="with --accuracy: bincounter only")
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args)
        return
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return

    from bincounter.config import with_overrides
    from bincounter.data.prepare import prepare

    steps = dict(zip(args.archs, args.steps + [args.steps[-1]] * len(args.archs)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build_splits(root, Path(args.sample), sample_ids(Path(args.sample), args.n))
        link_source(root, Path(args.sample))
        prepare(with_overrides(config, {"prepare.image_size": 256, "prepare.workers": 2}))
        train_bins = len((root / "splits" / "train.csv").read_text().splitlines()) - 1
        needed = args.batch_size * (max(steps.values()) + 1)
        if train_bins < needed:
            sys.exit(f"the train split has {train_bins} bins, fewer than the {needed} that --batch-size "
                     f"{args.batch_size} x (steps + 1 warm-up) needs: raise --n")
        for arch in args.archs:
            for pipeline in ("baseline", "bincounter") * args.repeats:
                cmd = [sys.executable, __file__, "--one", "--arch", arch, "--pipeline", pipeline, "--root", str(root),
                       "--steps", str(steps[arch]), "--batch-size", str(args.batch_size),
                       "--num-workers", str(args.num_workers), "--threads", str(args.threads),
                       "--precision", args.precision]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{arch}/{pipeline} failed:\n{proc.stderr[-3000:]}")
                out = proc.stdout
                result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
                print(result, flush=True)
                results.append(result)
    print(f"\ntorch CPU, {args.threads} threads, {os.cpu_count()} cores, batch {args.batch_size}, 224x224, "
          f"DataLoader workers {args.num_workers}")
    print("arch      pipeline    precision  steps  mean img/s  median img/s  best img/s  data share  peak RSS MB")
    for r in results:
        print(f"{r['arch']:9s} {r['pipeline']:10s}  {r['precision']:9s}  {r['steps']:5d}  {r['images_per_s']:10.2f}  "
              f"{r['median_step_images_per_s']:12.2f}  {r['best_step_images_per_s']:10.2f}  "
              f"{r['data_share']:10.0%}  {r['peak_rss_mb']:11.0f}")
    for arch in args.archs:
        base, ours = (max((r for r in results if r["arch"] == arch and r["pipeline"] == p),
                          key=lambda r: r["median_step_images_per_s"])
                      for p in ("baseline", "bincounter"))
        print(f"{arch}: bincounter / baseline = {ours['images_per_s'] / base['images_per_s']:.2f}x full step (mean), "
              f"{ours['median_step_images_per_s'] / base['median_step_images_per_s']:.2f}x (median step)")


if __name__ == "__main__":
    main()
