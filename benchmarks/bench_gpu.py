"""Training images/s on a GPU: compute only (a) vs the full pipeline from prepared shards (b), issue 13.

    python benchmarks/bench_gpu.py [--archs resnet18 resnet50] [--image-size 224] [--batch-size 128]
        [--steps 50] [--warmup 10] [--device auto|cuda|cpu] [--compile] [--num-workers -1]
        [--sample ../shared/abid-sample] [--n 0] [--work DIR] [--out benchmarks/gpu-results.md]

(a) compute: one synthetic uint8 batch already on the device, fed again every step.
(b) shards:  ShardDataset over the train split that bincounter's own stages (catalog, fetch, split, prepare,
             stored at image_size * 8/7: 256 px for 224) build from --sample once into --work
             (reused by later runs), sampled with replacement so any --steps fit; DataLoader workers as
             `bincounter train` sets them (train.num_workers, pin_memory); the JPEGs decoded in the workers
             (decode cpu) or batched on the GPU by nvJPEG (decode gpu: on_device=True, skipped without CUDA);
             train_transform(image_size, --augment); host-to-device copy; the step.
Both run bincounter.training.loop.train_one_epoch itself (to_device, loss.item(), grad norm, StepTimer's
syncs), BinCounterNet (uint8 in, channels_last), emd loss, AdamW, bf16 autocast; with --compile every
configuration runs eager and torch.compile'd. images/s = timed steps x batch / their wall time, the clock
read after torch.cuda.synchronize(). Target on a GPU: (b) >= 0.8 x (a). The markdown table is printed and
appended, with the machine and the command, to --out ('' = print only).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_prepare import DEFAULT_SAMPLE, make_config, sample_ids  # noqa: E402
from bench_quality import machine as cpu_machine  # noqa: E402

NUM_CLASSES = 6  # counts 0..5, data.max_count's default
TARGET = 0.8


class Synthetic:
    """(a)'s loader: the same device batch every step. dataset=None makes to_device a plain (no-op) .to()."""

    dataset = None

    def __init__(self, images: torch.Tensor, counts: torch.Tensor, steps: int):
        self.batch, self.steps = (images, counts), steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))


class Stamped:
    """Wraps a loader for train_one_epoch and reads the clock when the first timed batch arrives and when the
    loader runs dry. The device is synchronised first: queued kernels belong to the steps being timed."""

    def __init__(self, loader, warmup: int, device: torch.device, history):
        self.loader, self.dataset, self.warmup = loader, loader.dataset, warmup
        self.device, self.history = device, history
        self.start = self.end = (0.0, 0.0, 0.0)

    def __len__(self) -> int:
        return len(self.loader)

    def _mark(self) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), self.history.data_seconds, self.history.compute_seconds

    def __iter__(self):
        for k, batch in enumerate(self.loader):
            if k == self.warmup:
                self.start = self._mark()
            yield batch
        self.end = self._mark()


def prepared_train(args, stored: int) -> Path:
    """The train split at `stored` px, built once by bincounter's stages into --work, reused afterwards."""
    from bincounter.data.catalog import build_catalog
    from bincounter.data.fetch import fetch
    from bincounter.data.prepare import PREPARED_FILE, prepare
    from bincounter.data.split import split

    work = Path(args.work)
    out = work / f"prepared-{stored}px-{args.n or 'all'}"
    if (out / "train" / PREPARED_FILE).is_file():
        print(f"reusing {out}")
        return out / "train"
    work.mkdir(parents=True, exist_ok=True)
    ids = sample_ids(Path(args.sample), args.n or 10**9)
    config = make_config(work, Path(args.sample), ids, **{
        "data.catalog": str(work / "catalog.parquet"), "prepare.out_dir": str(out),
        "prepare.image_size": stored, "prepare.workers": 0,
        "split.strategy": "random"})  # which bins train does not matter to a speed test; any --n splits
    build_catalog(config.data)  # fetch reads its query from the catalog
    fetch(config.data)
    split(config)
    prepare(config)
    return out / "train"


def shard_loader(split_dir: Path, args, device: torch.device, on_device: bool):
    """(b)'s loader, set up as training.loop.make_loaders sets the train loader, except the sampler: with
    replacement, so the timed steps do not depend on the sample's size nor cross an epoch boundary."""
    from torch.utils.data import DataLoader, RandomSampler

    from bincounter.training.dataset import ShardDataset, train_transform
    from bincounter.training.loop import auto_workers

    dataset = ShardDataset(split_dir, train_transform(args.image_size, args.augment), on_device)
    sampler = RandomSampler(dataset, replacement=True, num_samples=args.batch_size * (args.warmup + args.steps),
                            generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, args.batch_size, sampler=sampler, drop_last=True, collate_fn=dataset.collate,
                      num_workers=auto_workers(args.num_workers, device),
                      pin_memory=device.type == "cuda" and not on_device)


def timed_epoch(model, loader, device: torch.device, args, arch: str) -> dict:
    """train_one_epoch over loader; -> images/s and the share of the timed steps spent waiting for data."""
    from bincounter.config import TrainConfig
    from bincounter.training.loop import autocast_dtype, build_optimizer, train_one_epoch
    from bincounter.training.loss import make_loss
    from bincounter.training.profiling import RunHistory

    history = RunHistory(device=device.type)
    stamped = Stamped(loader, args.warmup, device, history)
    optimizer = build_optimizer(model, TrainConfig(arch=arch))
    train_one_epoch(model, stamped, optimizer, make_loss("emd", 1.0).to(device), device, history,
                    amp_dtype=autocast_dtype("bf16", device), show_progress=False)
    seconds, data, compute = (e - s for s, e in zip(stamped.start, stamped.end))
    return {"images_per_s": args.batch_size * args.steps / seconds, "data_share": data / max(data + compute, 1e-9)}


def bench_arch(arch: str, compiled: bool, split_dir: Path, args, device: torch.device) -> list[dict]:
    """(a), then (b) per decoder, for one arch in one mode; one model is reused so torch.compile runs once
    per mode (in the first warm-up steps) and every configuration sees the same input shape."""
    from bincounter.model import build_model

    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES).to(device)
    if compiled:
        torch._dynamo.reset()  # the archs share BinCounterNet.forward's code object and its recompile budget
        model = torch.compile(model)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    synthetic = Synthetic(torch.randint(0, 256, shape, dtype=torch.uint8, device=device),
                          torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device), args.warmup + args.steps)
    mode = "compiled" if compiled else "eager"
    rows = [{"arch": arch, "mode": mode, "pipeline": "(a) compute", "decode": "-",
             **timed_epoch(model, synthetic, device, args, arch)}]
    print(rows[-1], flush=True)
    for decode in ("cpu", "gpu") if device.type == "cuda" else ("cpu",):
        loader = shard_loader(split_dir, args, device, on_device=decode == "gpu")
        rows.append({"arch": arch, "mode": mode, "pipeline": "(b) shards", "decode": decode,
                     **timed_epoch(model, loader, device, args, arch)})
        rows[-1]["ratio"] = rows[-1]["images_per_s"] / rows[0]["images_per_s"]
        print(rows[-1], flush=True)
    return rows


def describe(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return f"{cpu_machine()} | GPU: {gpu} | torch {torch.__version__}"


def table(rows: list[dict], args, device: torch.device, workers: int) -> str:
    decoders = {"-": "-", "cpu": f"CPU, loader workers: {workers}", "gpu": "GPU (nvJPEG)"}
    lines = ["| arch | mode | pipeline | JPEG decode | images/s | data wait | (b)/(a) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        if ratio and device.type == "cuda":
            ratio += " ok" if r["ratio"] >= TARGET else f" below {TARGET}"
        lines.append(f"| {r['arch']} | {r['mode']} | {r['pipeline']} | {decoders[r['decode']]} | "
                     f"{r['images_per_s']:.1f} | {r['data_share']:.0%} | {ratio} |")
    return "\n".join(lines)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, compile)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--compile", action="store_true", help="also run every configuration torch.compile'd")
    parser.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers; -1 = train's auto")
    parser.add_argument("--augment", type=float, default=0.5, help="train.augment strength")
    parser.add_argument("--sample", default=DEFAULT_SAMPLE, help="ABID folder in the bucket's layout")
    parser.add_argument("--n", type=int, default=0, help="sample bins to prepare (count <= 5; 0 = all)")
    parser.add_argument("--work", default=None, help="keep the prepared shards here and reuse them (default: temp)")
    parser.add_argument("--out", default=str(HERE / "gpu-results.md"), help="markdown file to append to; '' = none")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    from bincounter.training.loop import auto_workers, select_device

    device = select_device(args.device)
    command = "python benchmarks/bench_gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        split_dir = prepared_train(args, max(args.image_size, args.image_size * 8 // 7))
        for arch in args.archs:
            for compiled in (False, True) if args.compile else (False,):
                rows += bench_arch(arch, compiled, split_dir, args, device)
    skipped = "\nGPU decode (nvJPEG) skipped: no CUDA device. CPU figures, not GPU ones.\n"
    note = "" if device.type == "cuda" else skipped
    header = (f"\n<!-- {time.strftime('%Y-%m-%d %H:%M')} | {describe(device)} | device {device} | bf16 autocast | "
              f"batch {args.batch_size}, {args.image_size} px, {args.steps} timed steps after {args.warmup} | "
              f"`{command}` -->\n")
    text = header + table(rows, args, device, auto_workers(args.num_workers, device)) + "\n" + note
    print(text)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
