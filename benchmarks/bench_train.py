"""Training throughput (images/s for the full step: data + forward + backward + optimizer) and peak RSS,
bincounter's pipeline vs a seed-notebook-style baseline, same model / batch / steps, torch CPU.

    python benchmarks/bench_train.py [--sample ../shared/abid-sample] [--archs resnet18 resnet50]
                                     [--batch-size 16] [--steps 6 3] [--num-workers 0]

bincounter: PreparedDataset over a prepared (N,256,256,3) uint8 array + train_transform(224, 0.5)
            + BinCounterNet (normalises inside) + count_loss (CE + EMD), AdamW.
baseline:   ImageFolder-like dataset that opens each JPEG with PIL every epoch, Resize(224) + RandomCrop(224)
            + ToTensor + Normalize per sample, fp32, the same torchvision backbone + CE loss, AdamW.
Each (arch, pipeline) runs in its own subprocess, so ru_maxrss is that configuration's own peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prepare import DEFAULT_SAMPLE, build_splits, sample_ids  # noqa: E402


def one(args) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from bincounter.config import TrainConfig
    from bincounter.model import build_model
    from bincounter.train import count_loss

    cfg = TrainConfig(arch=args.arch, image_size=224, batch_size=args.batch_size)
    model = build_model(args.arch, 6)  # BinCounterNet(backbone with a 6-way head), weights=None
    if args.pipeline == "bincounter":
        from bincounter.data import PreparedDataset, train_transform

        dataset = PreparedDataset(Path(args.root) / "prepared" / "train", train_transform(224, 0.5))
        net = model

        def loss_fn(logits, y):
            return count_loss(logits, y, cfg, None)
    else:
        from PIL import Image
        from torchvision import transforms as T

        class JpegFolder(Dataset):  # what torchvision ImageFolder does: PIL open + transform per sample
            def __init__(self, root: Path, rows):
                self.items = [(root / f"{i}.jpg", c) for i, c in rows]
                self.tf = T.Compose([T.Resize(224), T.RandomCrop(224), T.ToTensor(),
                                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

            def __len__(self):
                return len(self.items)

            def __getitem__(self, k):
                path, count = self.items[k]
                with open(path, "rb") as f:
                    img = Image.open(f).convert("RGB")
                return self.tf(img), count

        from bincounter.split import read_split

        rows = read_split(Path(args.root) / "splits" / "train.csv")
        dataset = JpegFolder(Path(args.root) / "raw" / "bin-images", rows)
        net = model.backbone  # same weights/architecture, fed float normalised input
        loss_fn = torch.nn.functional.cross_entropy
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        drop_last=True, persistent_workers=False)
    # the input pipeline alone (no model), after one warm-up batch: the fastest batch, robust to a shared CPU
    batch_times, t0 = [], time.perf_counter()
    for k, _batch in enumerate(loader):
        now = time.perf_counter()
        if k:
            batch_times.append(now - t0)
        t0 = now
        if k == args.steps[0]:
            break
    data_only = args.batch_size / min(batch_times)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    it = iter(loader)
    times = []
    for step in range(1 + args.steps[0]):  # step 0 is the warm-up
        t0 = time.perf_counter()
        images, counts = next(it)
        t_data = time.perf_counter() - t0
        loss = loss_fn(net(images), counts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append((time.perf_counter() - t0, t_data))
    total = sum(t for t, _ in times)
    data = sum(d for _, d in times)
    step_times = sorted(t for t, _ in times)
    return {"arch": args.arch, "pipeline": args.pipeline, "steps": len(times),
            "best_step_images_per_s": args.batch_size / step_times[0],
            "median_step_images_per_s": args.batch_size / step_times[len(step_times) // 2],
            "images_per_s": len(times) * args.batch_size / total, "data_share": data / total,
            "data_only_images_per_s": data_only,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "input_dtype": str(images.dtype)}


def accuracy(args) -> None:
    import torch

    from bincounter.config import with_overrides
    from bincounter.prepare import prepare
    from bincounter.train import evaluate_split, fit

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build_splits(root, Path(args.sample), sample_ids(Path(args.sample), args.n))
        config = with_overrides(config, {
            "prepare.image_size": 144, "prepare.workers": 2, "train.arch": "resnet18", "train.image_size": 128,
            "train.epochs": args.epochs, "train.batch_size": 32, "train.num_workers": 1, "train.lr": 0.001,
            "train.data_dir": str(root / "prepared"), "train.checkpoint_dir": str(root / "ckpt"),
            "train.device": "cpu", "train.patience": 100})
        prepare(config)
        dirs = {name: root / "prepared" / name for name in ("train", "val", "test")}
        t0 = time.perf_counter()
        result = fit(config, dirs)
        seconds = time.perf_counter() - t0
        test = evaluate_split(result.model, dirs["test"], config, torch.device("cpu"))["metrics"]
    print(f"\nbincounter resnet18 128px (prepared 144), {args.epochs} epochs in {seconds:.0f}s, best epoch "
          f"{result.best_epoch}; test: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default=DEFAULT_SAMPLE)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 3], help="timed steps per arch (after 1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, same for both pipelines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="run each pipeline this many times, interleaved")
    parser.add_argument("--n", type=int, default=240, help="sample images to fetch/split/prepare")
    # internal: run one configuration
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: train bincounter (resnet18, 128 px from prepared 144) on a split of --n "
                             "count 0-5 images for --epochs and report test metrics")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    if args.accuracy:
        accuracy(args)
        return
    if args.one:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return

    from bincounter.config import with_overrides
    from bincounter.prepare import prepare

    steps = dict(zip(args.archs, args.steps + [args.steps[-1]] * len(args.archs)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build_splits(root, Path(args.sample), sample_ids(Path(args.sample), args.n))
        prepare(with_overrides(config, {"prepare.image_size": 256, "prepare.workers": 2}))
        for arch in args.archs:
            for pipeline in ("baseline", "bincounter") * args.repeats:
                cmd = [sys.executable, __file__, "--one", "--arch", arch, "--pipeline", pipeline, "--root", str(root),
                       "--steps", str(steps[arch]), "--batch-size", str(args.batch_size),
                       "--num-workers", str(args.num_workers), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{arch}/{pipeline} failed:\n{proc.stderr[-3000:]}")
                out = proc.stdout
                result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
                print(result, flush=True)
                results.append(result)
    print(f"\ntorch CPU, {args.threads} threads, {os.cpu_count()} cores, batch {args.batch_size}, 224x224, "
          f"DataLoader workers {args.num_workers}")
    print("arch      pipeline    steps  mean img/s  median img/s  best img/s  data share  peak RSS MB  loader-only img/s (best batch)")
    for r in results:
        print(f"{r['arch']:9s} {r['pipeline']:10s}  {r['steps']:5d}  {r['images_per_s']:10.2f}  "
              f"{r['median_step_images_per_s']:12.2f}  {r['best_step_images_per_s']:10.2f}  "
              f"{r['data_share']:10.0%}  {r['peak_rss_mb']:11.0f}  {r['data_only_images_per_s']:20.1f}")
    for arch in args.archs:
        base, ours = (max((r for r in results if r["arch"] == arch and r["pipeline"] == p),
                          key=lambda r: r["best_step_images_per_s"])
                      for p in ("baseline", "bincounter"))
        print(f"{arch}: bincounter / baseline = {ours['images_per_s'] / base['images_per_s']:.2f}x full step (mean), "
              f"{ours['best_step_images_per_s'] / base['best_step_images_per_s']:.2f}x (best step), "
              f"{ours['data_only_images_per_s'] / base['data_only_images_per_s']:.2f}x loader only")


if __name__ == "__main__":
    main()
