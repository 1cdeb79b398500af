"""Seconds per training step and per sampling step of the study's models, measured in one process
(issue 20, item 2: "training and sampling time per step next to the FLOP ratio").

The runs' own wall times do not compare models: the study shares the CPU between processes, runs
across sessions and is paused for benchmarks. So the finished models are timed again the way
``benchmarks/`` times everything (docs/benchmarks.md): in rounds, every model once per round, medians
over the rounds after the warm-up, all in one process. That is done per group (``plan.TIMING_GROUPS``),
as soon as the group's runs are trained: a group needs only its own runs' weights, and every group
times the isoparam and isoflop DiT/2 again from their configs (fresh weights: a DiT's time does not
depend on its weights), so each group's ratios to the baselines come from one process.

* A **training step** is ``dcdit.train``'s own step — the step's draws, forward, diffusion + ratio
  (+ DyDiT) loss, backward, clip, AdamW, EMA — on the run's stored config, starting from its final
  weights, so the router keeps the token counts it learned.
* A **sampling step** is one step of the study's guided DDPM sampler (the evaluation protocol's
  scale, the evaluation's tail-drop / Lite-CFG setting) on ``timing_per_class`` samples of each
  class, over a ``timing_sampling_steps``-step trajectory (its steps spread over t, since the kept
  count depends on t), divided by the number of steps.

Timed: the seed-0 models (the other seeds have the same architectures), the fine-tunes of the
demo checkpoint and every evaluation setting of them except the upcycling curve's checkpoints.
Baselines are timed at the plain evaluation setting (no tail-drop).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dcdit.checkpoint import find_checkpoint, load_model, load_state_dict_checked, read_weights
from dcdit.config import build_model, load_run_config
from dcdit.malloc import applied as malloc_applied
from dcdit.train import TrainingRun, accumulate_gradients, draw_step, optimizer_update, setup_run
from dcdit.train_log import TrainLogger
from dcdit.utils import atomic_write_text, cpu_info

from .evaluation import Protocol, sample_chunk
from .plan import Evaluation, Recipe, Run, Timing, sized


def timed_run(cfg, scratch: Path) -> tuple[TrainingRun, TrainLogger]:
    """A fresh training run of ``cfg`` in ``scratch`` (no initialisation file, no loggers), in train mode."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None, tensorboard=False, wandb=False))
    run = setup_run(cfg, scratch, resume=False, device="cpu")
    run.model.train()
    logger = TrainLogger(run.cfg, run.run_dir, run.dist, total_steps=10**9, start_step=0, resume_step=None, progress=False)
    return run, logger


def trainer(run_dir: Path, scratch: Path) -> tuple[TrainingRun, TrainLogger]:
    """A training run of ``run_dir``'s stored config in ``scratch``, holding its final weights."""
    folder = find_checkpoint(run_dir)
    state, cfg, _ = read_weights(folder / "model.safetensors")
    run, logger = timed_run(cfg, scratch)
    load_state_dict_checked(run.model, state, str(folder / "model.safetensors"))
    load_state_dict_checked(run.ema, read_weights(folder / "ema.safetensors")[0], str(folder / "ema.safetensors"))
    return run, logger


def baseline_trainer(run: Run, recipe: Recipe, scratch: Path) -> tuple[TrainingRun, TrainLogger]:
    """A training run of a baseline's config (with the study's overrides) and fresh weights."""
    return timed_run(load_run_config(run.config, list(sized(run, recipe).overrides)), scratch)


def training_step(run: TrainingRun, logger: TrainLogger) -> None:
    """One optimizer step exactly as ``dcdit.train``'s loop takes it (without logging or checkpoints)."""
    optimizer_update(run, accumulate_gradients(run, draw_step(run), logger))
    run.step += 1


def sampling_step_seconds(model, cfg, task: Evaluation, protocol: Protocol, recipe: Recipe) -> float:
    """One evaluation chunk (``evaluation.sample_chunk``, which times only the sampler) of
    ``timing_per_class`` samples per class over ``timing_sampling_steps`` steps, per step."""
    short = dataclasses.replace(protocol, sampling_steps=recipe.timing_sampling_steps)
    chunk = sample_chunk(model, cfg, recipe.timing_per_class, 0, short, task.tail, task.uncond_tail)
    return float(chunk["seconds"]) / recipe.timing_sampling_steps


def samplers_of(out: Path, task: Timing, recipe: Recipe, demo: Path) -> dict:
    """name -> (model, config, evaluation): the group's evaluations from their weights, the baselines
    (named after their runs) from their configs at the plain setting."""
    samplers = {}
    for e in task.sample:
        model, cfg, _ = load_model(demo if e.run == "demo" else out / e.run)
        samplers[e.name] = (model, cfg, e)
    for b in task.baselines:
        cfg = load_run_config(b.config, list(sized(b, recipe).overrides))
        samplers[b.name] = (build_model(cfg.model).eval(), cfg, Evaluation(b.name, b.name, task.phase))
    return samplers


def time_models(out: Path, task: Timing, recipe: Recipe, protocol: Protocol, demo: Path, threads: int) -> dict:
    """Time every model of ``task`` in interleaved rounds; writes and returns ``timing/<group>.json``."""
    path = out / "timing" / f"{task.name}.json"
    if path.exists():
        return json.loads(path.read_text())
    train_secs: dict[str, list[float]] = {n: [] for n in (*task.train, *(b.name for b in task.baselines))}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: trainer(out / n, Path(tmp) / n) for n in task.train}
        trainers |= {b.name: baseline_trainer(b, recipe, Path(tmp) / b.name) for b in task.baselines}
        samplers = samplers_of(out, task, recipe, demo)
        sample_secs: dict[str, list[float]] = {n: [] for n in samplers}
        for r in range(recipe.timing_warmup + recipe.timing_rounds):
            print(f"[timing] {task.name}: round {r + 1} of {recipe.timing_warmup + recipe.timing_rounds}", flush=True)
            keep = r >= recipe.timing_warmup
            for name, (run, logger) in trainers.items():
                t0 = time.perf_counter()
                training_step(run, logger)
                if keep:
                    train_secs[name].append(time.perf_counter() - t0)
            for name, (model, cfg, e) in samplers.items():
                with torch.inference_mode():
                    s = sampling_step_seconds(model, cfg, e, protocol, recipe)
                if keep:
                    sample_secs[name].append(s)
        for run, logger in trainers.values():
            logger.close()
    result = {"group": task.name, "cpu": cpu_info()["model"], "threads": threads, "malloc_reuse": malloc_applied(),
              "rounds": recipe.timing_rounds, "warmup_rounds": recipe.timing_warmup,
              "sampling": {"per_class": recipe.timing_per_class, "steps": recipe.timing_sampling_steps,
                           "sampler": protocol.sampler, "cfg_scale": protocol.cfg_scale},
              "baselines_from_config": [b.name for b in task.baselines],
              "train_s_per_step": {n: statistics.median(v) for n, v in train_secs.items()},
              "sampling_s_per_step": {n: statistics.median(v) for n, v in sample_secs.items()},
              "all": {"train": train_secs, "sampling": sample_secs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return result
