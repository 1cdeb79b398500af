"""Seconds per training step and per sampling step of the study's models, measured in one process
(issue 20, item 2: "training and sampling time per step next to the FLOP ratio").

The runs' own wall times do not compare models: the study shares the CPU between processes, runs
across sessions and is paused for benchmarks. So, after the last run, the finished models are timed
again the way ``benchmarks/`` times everything (docs/benchmarks.md): in rounds, every model once per
round, medians over the rounds after the warm-up, all in one process.

* A **training step** is ``dcdit.train``'s own step — the step's draws, forward, diffusion + ratio
  (+ DyDiT) loss, backward, clip, AdamW, EMA — on the run's stored config, starting from its final
  weights, so the router keeps the token counts it learned.
* A **sampling step** is one step of the study's guided DDPM sampler (the evaluation protocol's
  scale, the evaluation's tail-drop / Lite-CFG setting) on ``timing_per_class`` samples of each
  class, over a ``timing_sampling_steps``-step trajectory (its steps spread over t, since the kept
  count depends on t), divided by the number of steps.

Timed: the seed-0 models (the other seeds have the same architectures), the fine-tunes of the
demo checkpoint and every evaluation setting of them except the upcycling curve's checkpoints.
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
from dcdit.train import TrainingRun, accumulate_gradients, draw_step, optimizer_update, setup_run
from dcdit.train_log import TrainLogger
from dcdit.utils import atomic_write_text

from .evaluation import Protocol, sample_chunk
from .plan import Evaluation, Recipe, Timing

def trainer(run_dir: Path, scratch: Path) -> tuple[TrainingRun, TrainLogger]:
    """A training run of ``run_dir``'s stored config in ``scratch``, holding its final weights."""
    folder = find_checkpoint(run_dir)
    state, cfg, _ = read_weights(folder / "model.safetensors")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=None, tensorboard=False, wandb=False))
    run = setup_run(cfg, scratch, resume=False, device="cpu")
    load_state_dict_checked(run.model, state, str(folder / "model.safetensors"))
    load_state_dict_checked(run.ema, read_weights(folder / "ema.safetensors")[0], str(folder / "ema.safetensors"))
    run.model.train()
    logger = TrainLogger(run.cfg, run.run_dir, run.dist, total_steps=10**9, start_step=0, resume_step=None, progress=False)
    return run, logger


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


def time_models(out: Path, task: Timing, recipe: Recipe, protocol: Protocol, demo: Path, threads: int) -> dict:
    """Time every model of ``task`` in interleaved rounds; writes and returns ``timing/timing.json``."""
    path = out / "timing" / "timing.json"
    if path.exists():
        return json.loads(path.read_text())
    train_secs: dict[str, list[float]] = {n: [] for n in task.train}
    sample_secs: dict[str, list[float]] = {e.name: [] for e in task.sample}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {n: trainer(out / n, Path(tmp) / n) for n in task.train}
        samplers = {}
        for e in task.sample:
            model, cfg, _ = load_model(demo if e.run == "demo" else out / e.run)
            samplers[e.name] = (model, cfg, e)
        for r in range(recipe.timing_warmup + recipe.timing_rounds):
            print(f"[timing] round {r + 1} of {recipe.timing_warmup + recipe.timing_rounds}", flush=True)
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
    result = {"threads": threads, "rounds": recipe.timing_rounds, "warmup_rounds": recipe.timing_warmup,
              "sampling": {"per_class": recipe.timing_per_class, "steps": recipe.timing_sampling_steps,
                           "sampler": protocol.sampler, "cfg_scale": protocol.cfg_scale},
              "train_s_per_step": {n: statistics.median(v) for n, v in train_secs.items()},
              "sampling_s_per_step": {n: statistics.median(v) for n, v in sample_secs.items()},
              "all": {"train": train_secs, "sampling": sample_secs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2))
    return result
