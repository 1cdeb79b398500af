"""The study's record: its small finished files, kept in the repository so the study can go on in a
later session (``--record``; the project's own record is ``docs/results/table1/``).

Why: a session's machine starts empty — only the repository survives it — and the whole study
(~14 h of the 2-core CPU, ``reproduce_mnist.py``) is longer than a session. So each finished piece
is copied into the record as soon as it is finished, the record is committed, and a later session
restores it into its study folder and skips what the record holds:

* evaluations, the guidance selection, router analyses (with their pictures), timing groups, the
  baseline configs, the report: copied back into the study folder as they are;
* runs: their ``train_summary.json`` and ``log.csv`` (the paired ε-MSE) go to ``recorded/<run>/``
  in the study folder, which the report reads when the run's own folder has none. Weights are not
  recorded (megabytes each; the repository holds no large binaries): a task that still needs a
  recorded run's weights has the run trained again, to the last step it needs, and the new log is
  compared with the recorded one (``retrains.json``: same losses or not) — dcdit's training
  randomness is a function of (seed, step), so a retrain on the same code and thread count repeats
  the run.
"""

from __future__ import annotations

import csv
import filecmp
import json
import shutil
from pathlib import Path

from dcdit.utils import atomic_write_text

from .training import trained_step

#: Finished files restored into the study folder as they are (paths relative to it).
SHARED = ("selection/selection.json", "selection/*/result.json", "eval/*/result.json", "eval/*/grid.png",
          "router/*/router_analysis.json", "router/*/*.png", "timing/*.json", "configs/*.yaml", "retrains.json")
#: Written by the report; recorded, never restored (the report rewrites them).
REPORT = ("results.md", "results.json", "elastic.png", "upcycling.png")
#: A run's recorded files (the weights are not among them).
RUN_FILES = ("train_summary.json", "log.csv")
RECORDED = "recorded"  # <out>/recorded/<run>/: the record's run files


def restore(record: Path, out: Path) -> int:
    """Copy the record into the study folder where the folder lacks the file; returns how many."""
    copied = 0
    for pattern in SHARED:
        for src in record.glob(pattern):
            dest = out / src.relative_to(record)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                copied += 1
    for summary in record.glob(f"*/{RUN_FILES[0]}"):
        dest = out / RECORDED / summary.parent.name
        for name in RUN_FILES:
            if (summary.parent / name).exists() and not (dest / name).exists():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(summary.parent / name, dest / name)
                copied += 1
    return copied


def _copy_if_changed(src: Path, dest: Path) -> None:
    if not dest.exists() or not filecmp.cmp(src, dest, shallow=False):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)


def sync(out: Path, record: Path, steps_of: dict[str, int]) -> None:
    """Copy the study folder's finished files into the record. A run's files go in only when the run
    is finished (``steps_of``: run -> its steps; not a pause at a branch step) and got at least as far
    as the record's (a retrain that stopped early never replaces a full run)."""
    for pattern in (*SHARED, *REPORT):
        for src in out.glob(pattern):
            _copy_if_changed(src, record / src.relative_to(out))
    for run, steps in steps_of.items():
        step = trained_step(out / run)
        if step >= steps and step >= trained_step(record / run):
            for name in RUN_FILES:
                if (out / run / name).exists():
                    _copy_if_changed(out / run / name, record / run / name)


def run_folder(out: Path, run: str) -> Path:
    """Where the run's summary and log are: its own folder, or the record's copy when that got further."""
    own, recorded = out / run, out / RECORDED / run
    return recorded if trained_step(recorded) > trained_step(own) else own


def recorded_step(out: Path, run: str) -> int:
    """The step the record says the run reached (0: not recorded)."""
    return trained_step(out / RECORDED / run)


def mse_curve(out: Path, run: str) -> dict[int, float]:
    """Logged step -> the run's ε-MSE (each row the mean over the steps since the previous row), for
    the rows trained on the diffusion loss: an upcycling run's distillation warm-up logs no ε-MSE."""
    log = run_folder(out, run) / "log.csv"
    if not log.exists():
        return {}
    with open(log) as f:
        return {int(r["step"]): float(r["mse"]) for r in csv.DictReader(f)
                if r.get("mse") and not float(r.get("distill_loss") or 0)}


def _logged(log: Path) -> dict[int, dict]:
    """step -> the logged values at full precision, without the speed (which no two runs share)."""
    with open(log) as f:
        return {int(r["step"]): {k: v for k, v in r.items() if k != "steps_per_s"} for r in csv.DictReader(f)}


def compare_retrain(out: Path, run: str) -> str:
    """Whether the retrained run's log repeats the recorded one over their common steps; the verdict is
    kept in ``retrains.json`` (recorded) and returned."""
    new, old = _logged(out / run / "log.csv"), _logged(out / RECORDED / run / "log.csv")
    common = sorted(set(new) & set(old))
    differ = [s for s in common if new[s] != old[s]]
    if not common:
        verdict = "no common logged step with the recorded run"
    elif differ:
        s = differ[0]
        verdict = (f"differs from the recorded run from step {s} on (loss {new[s]['loss']} vs {old[s]['loss']}): "
                   f"{len(differ)} of {len(common)} logged steps")
    else:
        verdict = f"repeats the recorded run: every logged value equal at all {len(common)} logged steps up to step {common[-1]}"
    path = out / "retrains.json"
    notes = json.loads(path.read_text()) if path.exists() else {}
    notes[run] = verdict
    atomic_write_text(path, json.dumps(notes, indent=2))
    return verdict
