"""Profiles on every backend, the successor of SageMaker Debugger (closed to new customers).

- a torch.profiler trace of a few steps (opens in TensorBoard or https://ui.perfetto.dev) and a table of
  the top operators;
- a step-time breakdown: time waiting for data vs time computing;
- rule checks in the spirit of Debugger's built-in rules, each a pass/fail with its evidence;
- one markdown report that puts it all on a page.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class RunHistory:
    """What the rules look at, filled in by the training loop."""

    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    data_seconds: float = 0.0
    compute_seconds: float = 0.0
    train_loss: list[float] = field(default_factory=list)  # per epoch
    val_loss: list[float] = field(default_factory=list)
    gpu_utilization: list[float] = field(default_factory=list)  # percent samples, CUDA only
    device: str = "cpu"

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, data: dict) -> "RunHistory":
        return cls(**data)


class StepTimer:
    """Splits each step into waiting for the loader and computing (synchronising CUDA to be honest)."""

    def __init__(self, history: RunHistory, device: torch.device):
        self.history, self.cuda = history, device.type == "cuda"
        self._mark = time.perf_counter()

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.history.data_seconds += now - self._mark
        self._mark = now

    def step_done(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.history.compute_seconds += now - self._mark
        self._mark = now

    def restart(self) -> None:
        self._mark = time.perf_counter()


@dataclass
class RuleResult:
    name: str
    status: str  # pass | fail | skipped
    evidence: str


def _slope_t(values: list[float]) -> tuple[float, float]:
    """Least-squares slope of values over step index and its t statistic."""
    y = np.asarray(values, dtype=float)
    x = np.arange(len(y), dtype=float)
    x -= x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    residual = y - y.mean() - slope * x
    dof = max(len(y) - 2, 1)
    stderr = math.sqrt(float((residual**2).sum()) / dof / float((x * x).sum())) or 1e-12
    return slope, slope / stderr


def check_rules(h: RunHistory, *, data_fraction_limit: float = 0.4, min_gpu_util: float = 30.0) -> list[RuleResult]:
    results = []
    losses = [v for v in h.step_losses if math.isfinite(v)]
    if len(losses) < 4:
        results.append(RuleResult("loss_not_decreasing", "skipped", f"only {len(losses)} steps"))
    else:
        slope, t = _slope_t(losses)
        # A falling loss has a clearly negative slope; t > -2 means no evidence it is going down.
        failed = t > -2.0
        results.append(RuleResult("loss_not_decreasing", "fail" if failed else "pass",
                                  f"loss slope {slope:.3g}/step (t={t:.1f}) over {len(losses)} steps, "
                                  f"{losses[0]:.3f} -> {losses[-1]:.3f}"))
    if len(h.val_loss) < 3:
        results.append(RuleResult("overfit", "skipped", f"{len(h.val_loss)} epochs (needs 3)"))
    else:
        best = int(np.argmin(h.val_loss))
        rising = h.val_loss[-1] > h.val_loss[best] * 1.1 and best < len(h.val_loss) - 1
        train_falling = h.train_loss[-1] < h.train_loss[best]
        results.append(RuleResult("overfit", "fail" if rising and train_falling else "pass",
                                  f"best val loss {h.val_loss[best]:.3f} at epoch {best + 1}, last "
                                  f"{h.val_loss[-1]:.3f}; train loss {h.train_loss[best]:.3f} -> {h.train_loss[-1]:.3f}"))
    norms = np.asarray(h.grad_norms, dtype=float)
    if norms.size == 0:
        results += [RuleResult("vanishing_gradient", "skipped", "no steps"),
                    RuleResult("exploding_gradient", "skipped", "no steps")]
    else:
        finite = norms[np.isfinite(norms)]
        median = float(np.median(finite)) if finite.size else float("nan")
        results.append(RuleResult("vanishing_gradient", "fail" if finite.size and median < 1e-7 else "pass",
                                  f"median gradient norm {median:.3g}"))
        exploded = (~np.isfinite(norms)).sum() > 0 or (finite.size and finite.max() > 1e4)
        results.append(RuleResult("exploding_gradient", "fail" if exploded else "pass",
                                  f"max gradient norm {float(finite.max()) if finite.size else float('nan'):.3g}, "
                                  f"{int((~np.isfinite(norms)).sum())} non-finite"))
    total = h.data_seconds + h.compute_seconds
    if total <= 0:
        results.append(RuleResult("data_bottleneck", "skipped", "no timed steps"))
    else:
        fraction = h.data_seconds / total
        results.append(RuleResult("data_bottleneck", "fail" if fraction > data_fraction_limit else "pass",
                                  f"{fraction:.0%} of step time waiting for data "
                                  f"({h.data_seconds:.1f}s of {total:.1f}s; limit {data_fraction_limit:.0%})"))
    if h.device != "cuda":
        results.append(RuleResult("low_gpu_utilization", "skipped", f"ran on {h.device}"))
    elif not h.gpu_utilization:
        results.append(RuleResult("low_gpu_utilization", "skipped", "no utilisation samples (pynvml missing?)"))
    else:
        median = float(np.median(h.gpu_utilization))
        results.append(RuleResult("low_gpu_utilization", "fail" if median < min_gpu_util else "pass",
                                  f"median GPU utilisation {median:.0f}% (limit {min_gpu_util:.0f}%)"))
    return results


def gpu_utilization_sample() -> float | None:
    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - pynvml absent or driver without NVML: no sample
        return None


class TraceRecorder:
    """torch.profiler over `steps` training steps (after one wait and one warm-up step)."""

    def __init__(self, out_dir: Path, steps: int, device: torch.device):
        self.out_dir, self.steps, self.table = Path(out_dir), steps, ""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._ready,
            record_shapes=False,
        ) if steps > 0 else None
        self.done = steps <= 0
        self._count = 0

    def _ready(self, prof) -> None:
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        self.table = prof.key_averages().table(sort_by=self.sort_key, row_limit=15)
        (self.out_dir / "top_operators.txt").write_text(self.table + "\n")
        self.done = True

    def __enter__(self):
        if self.profiler is not None:
            self.profiler.__enter__()
        return self

    def step(self) -> None:
        if self.profiler is None or self.done:
            return
        self.profiler.step()
        self._count += 1

    def __exit__(self, *exc):
        if self.profiler is not None:
            self.profiler.__exit__(*exc)
            self.profiler = None


def write_report(path: Path, rules: list[RuleResult], h: RunHistory, top_ops: str, context: dict) -> Path:
    total = h.data_seconds + h.compute_seconds
    lines = ["# bincounter profile report", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "## Rules", "", "| rule | result | evidence |", "| --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status.upper()} | {r.evidence} |" for r in rules]
    lines += ["", "## Step time", ""]
    if total > 0:
        lines += [f"- waiting for data: {h.data_seconds:.2f}s ({h.data_seconds / total:.0%})",
                  f"- compute (forward, backward, optimiser): {h.compute_seconds:.2f}s ({h.compute_seconds / total:.0%})",
                  f"- steps: {len(h.step_losses)}"]
    lines += ["", "## Top operators (torch.profiler)", "",
              "The full trace is `trace.json` beside this report: open it in TensorBoard or ui.perfetto.dev.", "",
              "```", top_ops.strip() or "(profiling was off)", "```", ""]
    path.write_text("\n".join(lines))
    return path
