"""Training the study's runs with `dcdit train`: skip what is done, resume what was interrupted,
branch a run off another's checkpoint, pause at the steps other runs branch from."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .plan import Recipe, Run, sized


class StudyError(RuntimeError):
    """A step of the study failed; the message is one line naming the log to read."""


def dcdit(argv: list[str], log: Path, recipe: Recipe, threads: int) -> None:
    """Run the `dcdit` command line with ``argv``, its output appended to ``log``: a subprocess (its own
    memory, its own log), or in this process in the smoke mode (no interpreter start-up per run)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ dcdit {' '.join(argv)}\n")
        f.flush()
        if recipe.in_process:
            from dcdit.cli import main

            try:
                with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    rc = main(argv)
            except SystemExit as e:  # argparse errors
                rc = e.code if isinstance(e.code, int) else 1
        else:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            rc = subprocess.run([sys.executable, "-m", "dcdit", *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                                check=False).returncode
    if rc:
        raise StudyError(f"`dcdit {argv[0]}` failed with exit code {rc}: see the end of {log}")


def baseline_configs(out: Path, recipe: Recipe, threads: int) -> Path:
    """``<out>/configs/{isoparam,isoflop}.yaml`` from `dcdit baselines mnist-release` (nominal budget)."""
    folder = out / "configs"
    if not (folder / "isoflop.yaml").exists():
        dcdit(["baselines", "mnist-release", *recipe.model_overrides, "--out", str(folder)], out / "logs" / "baselines.log",
              recipe, threads)
    return folder


def trained_step(run_dir: Path) -> int:
    """The step the run's last finished `dcdit train` call reached (0: none finished)."""
    summary = run_dir / "train_summary.json"
    return json.loads(summary.read_text())["step"] if summary.exists() else 0


def run_done(run_dir: Path, steps: int) -> bool:
    return trained_step(run_dir) >= steps


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").exists()


def branch(out: Path, run: Run) -> bool:
    """Start ``run``'s folder from the checkpoint ``run.branch`` = (source, step) and the source's log up
    to that step. Until that step the two runs are the same run (same seed, same per-step randomness).
    False when the source has not reached the step yet."""
    source, step = run.branch
    ckpt = out / source / "checkpoints" / f"{step:07d}"
    if not ckpt.exists():
        return False
    dest = out / run.name / "checkpoints"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, dest / ckpt.name, dirs_exist_ok=True)
    with open(out / source / "log.csv") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [row for row in rows[1:] if int(row[0]) <= step]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(kept)
    (out / run.name / "log.csv").write_text(buf.getvalue())
    (dest / "latest").write_text(ckpt.name)  # last: a half-made branch is made again
    return True


def train_run(out: Path, run: Run, recipe: Recipe, threads: int, until: int | None = None) -> bool:
    """Train ``run`` to its steps, or only ``until`` that step (through its stops), resuming from its
    latest checkpoint. Returns False (and says why) when it has to wait for another run."""
    run_dir = out / run.name
    waiting = [n for n in run.needs if not (out / n / "train_summary.json").exists()]
    if waiting:
        print(f"[train] {run.name}: waits for {', '.join(waiting)}", flush=True)
        return False
    if run.branch and not has_checkpoint(run_dir) and not branch(out, run):
        print(f"[train] {run.name}: waits for {run.branch[0]} to reach step {run.branch[1]}", flush=True)
        return False
    run = sized(run, recipe)
    last = run.steps if until is None else min(until, run.steps)
    for target in sorted({*(s for s in run.stops if s < last), last}):
        if trained_step(run_dir) >= target:
            continue
        argv = ["train", run.config, *run.overrides, f"train.steps={target}", "--out", str(run_dir), "--no-progress"]
        if has_checkpoint(run_dir):
            argv.append("--resume")
            if run.branch:
                argv.append("--allow-changed")  # the branch changes train.multi_budget on purpose
        log = out / "logs" / f"{run.name}.log"
        print(f"[train] {run.name}: to step {target}{' (resumed)' if '--resume' in argv else ''}; log {log}", flush=True)
        t0 = time.perf_counter()
        dcdit(argv, log, recipe, threads)
        print(f"[train] {run.name}: step {trained_step(run_dir)} in {time.perf_counter() - t0:.0f} s", flush=True)
    return True
