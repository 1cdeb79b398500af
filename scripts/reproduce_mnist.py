"""Table 1 at MNIST scale (issue 20): DC-DiT against the parameter- and FLOP-matched DiT/2, with models
that draw digits, and the ablations of the paper's other claims (arXiv 2603.06351 §4; docs/results.md).

    python scripts/reproduce_mnist.py --out runs/table1 --record docs/results/table1   # the whole study, resumable
    python scripts/reproduce_mnist.py --out runs/table1 --only scale main   # some phases
    python scripts/reproduce_mnist.py --out runs/table1 --runs 'iso*_s0'    # the tasks of some runs
    python scripts/reproduce_mnist.py --out runs/table1 --only report       # just rewrite results.md
    python scripts/reproduce_mnist.py --out /tmp/smoke --smoke              # everything wired, tiny, ~1 min

The runs, the order and the budget choice are in ``scripts/mnist_study/plan.py``; the evaluation
protocol in ``evaluation.py``; the verdict rules in ``rules.py``. Phases, in the order they run:
scale (guidance selection), main (DC-DiT / isoparam / isoflop per seed), elastic, router, random,
multibudget, upcycle, dydit, cosine, timing (the finished models' time per step, a group of models
per process: ``timing.py``). Finished runs and evaluations are skipped (``train_summary.json``,
``eval/<name>/result.json``, ``timing/<group>.json``); an interrupted run resumes from its latest
checkpoint (``dcdit train --resume``), an interrupted evaluation from its last saved chunk of
samples. ``results.md`` is rewritten after every step, so it always shows what is finished.

``--record DIR`` makes the study outlive the machine: every finished result (not the weights) is
copied to DIR as it finishes, and a later invocation on an empty ``--out`` restores DIR and goes on
from there, training a recorded run again only as far as a task still needs its weights
(``record.py``). The project's record, committed session by session, is ``docs/results/table1``.

Cost on the 2-core CPU (1 thread per process, two processes with disjoint ``--runs`` / ``--only``):
dcdit_release 0.45–0.7 steps/s (75–110 min a run: the host's speed varied between sessions), the
isoparam DiT/2 0.6–0.9 steps/s alongside it; an evaluation (500 samples, DDPM 50, guided) ~18 min
with glibc's allocator defaults, 8–12 min on two processes sharing its chunks since
``dcdit.malloc`` (150–230 s a chunk of 100 samples); the guidance selection ~20 min. The whole
study (with the random router on every seed) is ≈ 17 process-hours, several working sessions: hence
the record. Two invocations may share a folder with disjoint ``--only`` phases or ``--runs``
patterns (two 1-thread processes, ``--threads 1``, gave ~1.2× the throughput of one 2-thread
process); a run asked of both is refused by the second (``dcdit train`` locks its run folder:
``dcdit.run_lock``), while an evaluation asked of both is split by its chunks, each claimed by one
process (``evaluation.claim``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from mnist_study.evaluation import evaluate, protocol, select_guidance
from mnist_study.plan import (
    PHASES,
    SMOKE,
    Evaluation,
    Recipe,
    RouterAnalysis,
    Run,
    Timing,
    task_phase,
    tasks,
    weights_read,
)
from mnist_study.record import compare_retrain, recorded_step, restore, sync
from mnist_study.report import write_report
from mnist_study.timing import time_models
from mnist_study.training import StudyError, baseline_configs, run_done, train_run, trained_step

from dcdit import DEMO_CHECKPOINT
from dcdit.checkpoint import read_weights
from dcdit.evaluation.router_analysis import analyze_router
from dcdit.malloc import reuse_freed_memory



def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/table1", help="study folder (everything is written and resumed here)")
    ap.add_argument("--only", nargs="+", choices=[*PHASES, "report"], help="run only these phases (the report is always written)")
    ap.add_argument("--record", help="keep the finished results here too and resume from them (a folder in the repository: "
                    "the study outlives a session's machine; scripts/mnist_study/record.py)")
    ap.add_argument("--runs", nargs="+", metavar="PATTERN",
                    help="run only the tasks of these runs (shell patterns, e.g. 'iso*_s0'): two processes can share a folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main three models (the ablations use seed 0)")
    ap.add_argument("--steps", type=int, help="training steps of every from-scratch run (default 3000; smoke 12)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for training and sampling")
    ap.add_argument("--smoke", action="store_true", help="tiny model, steps and samples: checks the wiring, not the claims")
    return ap.parse_args(argv)


def router(out: Path, task: RouterAnalysis, recipe: Recipe, ckpt: Path) -> dict:
    folder = out / "router" / task.name
    if not (folder / "router_analysis.json").exists():
        print(f"[router] {task.name}", flush=True)
        analyze_router(ckpt, folder, num_images=recipe.router_images, sampling_steps=recipe.router_sampling_steps)
    return json.loads((folder / "router_analysis.json").read_text())


def finished_routers(out: Path, plan: list) -> dict[str, dict]:
    """The router analyses finished here or in the record, so that the reports written before the
    loop reaches the router phase show them too (a report is rewritten whenever anything finishes)."""
    paths = {t.name: out / "router" / t.name / "router_analysis.json" for t in plan if isinstance(t, RouterAnalysis)}
    return {name: json.loads(p.read_text()) for name, p in paths.items() if p.exists()}


def checkpoint(out: Path, run: str, step: int | None, steps_of: dict[str, int]) -> Path | None:
    """The weights an evaluation reads, or None while they are not trained yet."""
    if run == "demo":
        return DEMO_CHECKPOINT
    if step is not None:
        folder = out / run / "checkpoints" / f"{step:07d}"
        return folder if folder.exists() else None
    return out / run if run_done(out / run, steps_of[run]) else None


def execute(out: Path, task, recipe: Recipe, steps_of: dict, state: dict, threads: int) -> None:
    """One task of the plan; skips (saying why) what cannot run yet."""
    if isinstance(task, Run):
        train_or_skip(out, task, recipe, threads, state["pending"], steps_of)
    elif isinstance(task, Evaluation):
        ckpt = checkpoint(out, task.run, task.step, steps_of)
        if state["selection"] is None:  # another process may have made it since this one started
            state["selection"] = read_selection(out)
        if state["selection"] is None or ckpt is None:
            print(f"[eval] {task.name}: waits for {'the guidance scale' if ckpt else task.run}", flush=True)
            return
        evaluate(ckpt, out / "eval" / task.name, protocol(recipe, state["selection"]["cfg_scale"]), tail=task.tail,
                 uncond_tail=task.uncond_tail, label=task.name, threads=threads)
    elif isinstance(task, RouterAnalysis):
        ckpt = checkpoint(out, task.run, None, steps_of)
        if ckpt is not None or (out / "router" / task.name / "router_analysis.json").exists():
            state["routers"][task.name] = router(out, task, recipe, ckpt)
    elif isinstance(task, Timing):
        waiting = [n for n in task.needs if not run_done(out / n, steps_of[n])]
        if state["selection"] is None or waiting:
            print(f"[timing] waits for {', '.join(waiting) or 'the guidance scale'}", flush=True)
            return
        time_models(out, task, recipe, protocol(recipe, state["selection"]["cfg_scale"]), DEMO_CHECKPOINT, threads)
    else:  # ("scale", None)
        state["selection"] = select_guidance(out, DEMO_CHECKPOINT, recipe, threads)


def task_done(out: Path, task, steps_of: dict[str, int]) -> bool:
    """Finished here or in the restored record (a recorded run counts as finished: see :func:`train_or_skip`)."""
    if isinstance(task, Run):
        return max(trained_step(out / task.name), recorded_step(out, task.name)) >= task.steps
    if isinstance(task, Evaluation):
        return (out / "eval" / task.name / "result.json").exists()
    if isinstance(task, RouterAnalysis):
        return (out / "router" / task.name / "router_analysis.json").exists()
    if isinstance(task, Timing):
        return (out / "timing" / f"{task.name}.json").exists()
    return read_selection(out) is not None  # ("scale", None)


def train_or_skip(out: Path, run: Run, recipe: Recipe, threads: int, pending: list, steps_of: dict[str, int]) -> None:
    """Train ``run``; or, when the record holds it finished, train it again only as far as a pending
    task needs its weights (and compare the new log with the recorded one), or not at all."""
    if trained_step(out / run.name) >= run.steps or recorded_step(out, run.name) < run.steps:
        train_run(out, run, recipe, threads)
        return
    wanted = [steps_of[r] if step is None else step for t in pending for r, step in weights_read(t) if r == run.name]
    if not wanted or trained_step(out / run.name) >= max(wanted):
        return
    print(f"[train] {run.name}: recorded, its weights are not; trained again to step {max(wanted)} for "
          f"{', '.join(sorted({t.name for t in pending if run.name in (r for r, _ in weights_read(t))}))}", flush=True)
    if train_run(out, run, recipe, threads, until=max(wanted)):
        print(f"[train] {run.name}: {compare_retrain(out, run.name)}", flush=True)


def read_selection(out: Path) -> dict | None:
    path = out / "selection" / "selection.json"
    return json.loads(path.read_text()) if path.exists() else None


def selected(task, phases: set[str], runs: list[str] | None) -> bool:
    """Whether this invocation runs ``task``: its phase is asked for and, with ``--runs``, its run matches."""
    if task_phase(task) not in phases:
        return False
    run = getattr(task, "run", getattr(task, "name", None)) if not isinstance(task, (tuple, Timing)) else None
    return runs is None or run is None or any(fnmatch.fnmatchcase(run, p) for p in runs)


def finished(out: Path) -> set[Path]:
    """The files that mark finished work (a report is due when this set grows)."""
    return {*out.glob("*/train_summary.json"), *out.glob("eval/*/result.json"), *out.glob("router/*/router_analysis.json"),
            *out.glob("selection/selection.json"), *out.glob("timing/*.json")}


def main(argv=None) -> int:
    args = parse_args(argv)
    recipe = SMOKE if args.smoke else Recipe()
    if args.steps:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    out, seeds = Path(args.out), sorted(set(args.seeds))
    phases = set(args.only or PHASES)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # the evaluations: a third less CPU time per sampling forward (dcdit.malloc)
    command = "python scripts/reproduce_mnist.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    demo_schedule = read_weights(DEMO_CHECKPOINT)[1].model.noise_schedule
    record = Path(args.record) if args.record else None
    if record is not None and record.exists():
        print(f"restored {restore(record, out)} finished file(s) from the record {record}", flush=True)
    try:
        baseline_configs(out, recipe, args.threads)
        plan = tasks(out, recipe, seeds, DEMO_CHECKPOINT, demo_schedule)
        runs = [t.name for t in plan if isinstance(t, Run)]
        steps_of = {t.name: t.steps for t in plan if isinstance(t, Run)}
        report = {"recipe": recipe, "seeds": seeds, "command": command, "train_runs": runs,
                  "eval_order": [t.name for t in plan if isinstance(t, Evaluation)]}
        state = {"selection": read_selection(out), "routers": finished_routers(out, plan),
                 "pending": [t for t in plan if selected(t, phases, args.runs) and not task_done(out, t, steps_of)]}
        t0, done = time.perf_counter(), finished(out)
        for task in plan:
            if isinstance(task, (Evaluation, Timing)) and task_done(out, task, steps_of):
                continue  # finished here or in the record: nothing to wait for
            if selected(task, phases, args.runs) or (isinstance(task, RouterAnalysis) and (out / "router" / task.name).exists()):
                execute(out, task, recipe, steps_of, state, args.threads)
                if len(finished(out)) > len(done):  # something new: the report shows it at once (the plot at the end)
                    done = finished(out)
                    write_report(out, selection=state["selection"], routers=state["routers"], **report, plot=False)
                    if record is not None:
                        sync(out, record, steps_of)
        path = write_report(out, selection=state["selection"], routers=state["routers"], **report)
        if record is not None:
            sync(out, record, steps_of)
    except StudyError as e:
        print(f"reproduce_mnist: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
