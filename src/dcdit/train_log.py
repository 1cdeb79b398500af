"""What a training run reports: ``log.csv``, TensorBoard / Weights & Biases scalars and the progress bar.

:class:`TrainLogger` collects the loss terms of every micro-batch between two log lines, averages
them over the interval and over the ranks (a collective: every rank calls :meth:`TrainLogger.write`
at the same steps) and writes one row. Columns: ``loss`` (the total the optimizer saw),
``diffusion_loss`` (MSE + VLB, or the distillation loss while upcycling), ``mse``, ``vb``,
``ratio_loss``, ``grad_norm`` (before clipping), ``distill_loss``, ``dydit_flops_loss``,
``dydit_flops_ratio``, ``steps_per_s``, ``skipped_steps`` (total so far), ``tail_fraction`` and, for
a DC-DiT, the natural and effective compression ratios of the interval's samples.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed as D


class CSVLog:
    """``log.csv``: one row per logged step. Rewrites (resume, new columns) go through a temporary
    file and an atomic rename, and work on raw rows, so a malformed row never costs the log."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():  # drop rows logged after the checkpoint we resume from
            rows = self._raw_rows()
            if rows:
                keep = [r for r in rows[1:] if r and (not r[0].isdigit() or int(r[0]) <= resume_step)]
                self._replace([rows[0], *keep])

    def _raw_rows(self) -> list[list[str]]:
        with open(self.path, newline="") as f:
            return list(csv.reader(f))

    def _replace(self, rows: list[list[str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        header = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
        if header is not None and header != list(row):  # columns changed (e.g. a newer dcdit resumed the run)
            fields = header + [k for k in row if k not in header]
            old = self._raw_rows()[1:]  # old rows keep their values in the old columns, empty in the new
            self._replace([fields, *(r + [""] * (len(fields) - len(r)) for r in old)])
            header = fields
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if header is None:
                w.writeheader()
            w.writerow(row)


def open_tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tb"))


def open_wandb(cfg, run_dir: Path, enabled: bool):
    if not enabled:
        return None
    import wandb  # optional dependency; a clear ImportError names it

    return wandb.init(project="dcdit", dir=str(run_dir), config=json.loads(json.dumps(cfg, default=vars)))


# the interval sums, in the order of the row's columns
_TERMS = ("loss", "diffusion", "mse", "vb", "ratio", "grad_norm", "distill", "dydit_loss", "dydit_ratio")
_COLUMNS = ("loss", "diffusion_loss", "mse", "vb", "ratio_loss", "grad_norm", "distill_loss", "dydit_flops_loss",
            "dydit_flops_ratio")


@dataclass
class _Interval:
    """Running sums between two log lines (local to a rank)."""

    steps: int = 0
    sums: dict = field(default_factory=lambda: dict.fromkeys(_TERMS, 0.0))
    natural_ratios: list = field(default_factory=list)
    effective_ratios: list = field(default_factory=list)
    fractions: list = field(default_factory=list)
    t0: float = field(default_factory=time.time)


class TrainLogger:
    """The run's reporting. Rank 0 writes ``config.yaml``, ``log.csv``, TensorBoard and wandb; every
    rank takes part in the averaging. ``resume_step``: the step a resumed run starts from (rows
    logged after it are dropped from ``log.csv``); None for a new run."""

    def __init__(self, cfg, run_dir: Path, dist: D.DistInfo, *, total_steps: int, start_step: int,
                 resume_step: int | None, progress: bool):
        from .config import save_run_config

        self.dist, self.csv, self.tb, self.wb = dist, None, None, None
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_run_config(cfg, run_dir / "config.yaml")
            self.csv = CSVLog(run_dir / "log.csv", resume_step=resume_step)
            self.tb = open_tensorboard(run_dir, cfg.train.tensorboard)
            self.wb = open_wandb(cfg, run_dir, cfg.train.wandb)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and dist.is_main), desc="train",
                        dynamic_ncols=True)
        self.interval = _Interval()
        self.last: dict = {}

    def add_micro_batch(self, terms: dict, accum: int) -> None:
        """One micro-batch's loss terms (floats or 0-d tensors; missing ones count 0) and, for a
        DC-DiT, its routing record under ``"record"``."""
        for k in _TERMS:
            v = terms.get(k)
            if v is not None and k != "grad_norm":
                self.interval.sums[k] += float(v.detach() if isinstance(v, torch.Tensor) else v) / accum
        record = terms.get("record")
        if record is not None:
            self.interval.natural_ratios.append(record.natural_compression_ratio.detach().cpu())
            self.interval.effective_ratios.append(record.compression_ratio.detach().cpu())

    def end_step(self, step: int, fraction: float, grad_norm: float, applied: bool) -> None:
        """After the optimizer update of step index ``step`` (0-based)."""
        if not applied:
            self.bar.write(f"step {step + 1}: non-finite loss or gradient norm ({grad_norm}); step skipped")
        self.interval.sums["grad_norm"] += grad_norm if torch.isfinite(torch.tensor(grad_norm)) else 0.0
        self.interval.fractions.append(fraction)
        self.interval.steps += 1
        self.bar.update(1)

    def write(self, step: int, skipped_total: int, device) -> dict:
        """Average the interval over its steps and the ranks, write the row (rank 0), start a new interval."""
        acc = self.interval
        means = torch.tensor([acc.sums[k] for k in _TERMS], device=device) / max(acc.steps, 1)
        D.all_reduce_(means)
        means /= self.dist.world_size
        row = {"step": step, **{c: float(v) for c, v in zip(_COLUMNS, means)},
               "steps_per_s": acc.steps / max(time.time() - acc.t0, 1e-9), "skipped_steps": skipped_total,
               "tail_fraction": sum(acc.fractions) / max(len(acc.fractions), 1)}
        if acc.natural_ratios:
            row.update(_compression_columns(acc, device))
        if self.dist.is_main:
            self._emit(step, row)
        self.interval, self.last = _Interval(), row
        return row

    def _emit(self, step: int, row: dict) -> None:
        self.csv.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wb is not None:
            self.wb.log(row, step=step)
        self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _compression_columns(acc: _Interval, device) -> dict:
    nat = D.all_gather_cat(torch.cat(acc.natural_ratios).to(device)).float()
    eff = D.all_gather_cat(torch.cat(acc.effective_ratios).to(device)).float()
    return {"compression_mean": float(nat.mean()), "compression_std": float(nat.std()) if nat.numel() > 1 else 0.0,
            "compression_min": float(nat.min()), "compression_max": float(nat.max()),
            "effective_compression_mean": float(eff.mean())}
