"""What the study trains and evaluates, and in which order (paper arXiv 2603.06351 §4).

Every from-scratch run uses the demo recipe (``configs/mnist.yaml``: cosine schedule, label-embedding
init 1.0, ``steps`` steps of batch 32) and differs from the others of its seed only in the model.
dcdit's training randomness is a function of (seed, step) only (``dcdit.train``), so the runs of a
seed see the same images, timesteps, noise and label dropout at every step; the paired ε-MSE
compares them over the same steps.

Runs (seed k in ``--seeds`` for the first four, seed 0 for the rest):

  dcdit_release_sK    configs/mnist-release.yaml (the release's model semantics)         claims (a)–(c)
  isoparam_sK         DiT/2, parameter-matched to it (`dcdit baselines`, nominal L/N)      claim (a)
  isoflop_sK          DiT/2, the smallest depth whose MACs reach its nominal L/N budget   claim (a)
  random_sK           dcdit_release with the random router                                claim (d)
                      (issue 20 asked for seed 0; it came out ahead of the learned router
                      there, so the other seeds decide whether that is the seed: docs/results.md)
  multibudget_s0      dcdit_release with the release's tail-drop fractions 0.0–0.6 from 1/8 of the
                      run (the release: from 50k of 400k steps); it branches off dcdit_release_s0 there
  upcycle_s0 / upcycle_distill_s0   isoparam_s0 upcycled into dcdit_release (§4.4), 1/4 of the steps,
                      without / with activation distillation, against dcdit_release_s0 at equal steps
  dydit_demo / demo_finetune        the shipped demo checkpoint fine-tuned to λ = 0.7 with DyDiT (§4.5),
                      and the same fine-tune without DyDiT
  dcdit_cosine_s0     configs/mnist.yaml (the paper-text cosine router)                 last, "if time allows"

Then the time per training and sampling step of the finished models, in groups (:data:`TIMING_GROUPS`),
each group timed in one process with its own DiT baselines (``timing.py``: the runs' own wall times
come from a shared CPU).

The isoflop budget is nominal (L/N kept tokens per forward), not measured: it is fixed before any
DC-DiT is trained, so all baselines of all seeds are built at once and in parallel with the DC-DiT
runs, and it is the paper's own definition of the budget. The measured GFLOPs of every model along
its evaluation sampling are reported next to it, so how well the match held is in the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

MAIN = ("dcdit_release", "isoparam", "isoflop")
GUIDANCE_SCALES = (1.5, 2.0, 3.0, 4.0)
TAILS = (0.0, 0.25, 0.5, 0.75)
LITE_CFG = (0.0, 0.9)  # (conditional, unconditional) tail-drop fractions: the release README's Lite-CFG setting
RELEASE_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # configs/DC-DiT-B-N4-release.yaml
PHASES = ("scale", "main", "elastic", "router", "random", "multibudget", "upcycle", "dydit", "cosine", "timing")


@dataclass(frozen=True)
class Recipe:
    """The study's sizes. The defaults are the real study; :data:`SMOKE` wires everything in seconds."""

    steps: int = 3000  # every from-scratch run (configs/mnist.yaml)
    model_overrides: tuple[str, ...] = ()  # smoke: a tiny model (applied to the baselines too)
    train_overrides: tuple[str, ...] = ()  # smoke: a small batch
    log_every: int = 50
    dydit_steps: int = 400
    dydit_warmup_steps: int = 150
    dydit_ckpt_every: int = 50
    samples_per_class: int = 50  # evaluation: 500 samples
    chunk_per_class: int = 10  # sampled and saved 100 at a time (an interrupted evaluation loses one chunk)
    sampling_steps: int = 50  # DDPM 50, the demo's sampler
    selection_per_class: int = 10  # guidance-scale selection: 100 samples of the demo checkpoint
    scales: tuple[float, ...] = GUIDANCE_SCALES
    bootstrap: int = 1000
    router_images: int = 200
    router_sampling_steps: int = 50
    timing_rounds: int = 5  # the timing phase (timing.py): rounds after the warm-up, medians reported
    timing_warmup: int = 1
    timing_per_class: int = 2  # a sampling step is timed on 20 samples (40 rows with guidance)
    timing_sampling_steps: int = 10
    in_process: bool = False  # train inside this process (smoke) instead of a `dcdit train` subprocess

    @property
    def ckpt_every(self) -> int:  # 250 of 3,000: the upcycling curve's evaluation points
        return max(1, self.steps // 12)

    @property
    def multibudget_start(self) -> int:  # the release: 50k of 400k steps
        return max(1, self.steps // 8)

    @property
    def upcycle_steps(self) -> int:  # a quarter of the from-scratch budget (the paper: 12.5% at ImageNet scale)
        return max(1, self.steps // 4)

    @property
    def upcycle_mse_window(self) -> int:  # the upcycling table's training ε-MSE: the 100 steps up to a point
        return max(1, self.steps // 30)

    @property
    def distill_steps(self) -> int:
        return max(1, self.steps // 10)

    @property
    def mse_window(self) -> int:  # the paired ε-MSE: the last 500 of 3,000 steps
        return max(1, self.steps // 6)


SMOKE = Recipe(
    steps=12,
    model_overrides=("model.hidden_size=32", "model.num_heads=2", "model.encoder_width=8", "model.depth=1"),
    train_overrides=("train.global_batch_size=8", "train.ratio_batch_size=8", "train.tensorboard=false"),
    log_every=1, dydit_steps=2, dydit_warmup_steps=1, dydit_ckpt_every=1, samples_per_class=1, chunk_per_class=1,
    sampling_steps=2, selection_per_class=1, scales=(1.5, 4.0), bootstrap=20, router_images=4,
    router_sampling_steps=0, timing_rounds=1, timing_per_class=1, timing_sampling_steps=2, in_process=True,
)


@dataclass(frozen=True)
class Run:
    """One `dcdit train` run. ``stops``: steps it pauses at (a checkpoint another run branches from);
    ``branch``: (run, step) whose checkpoint it starts from; ``needs``: runs that must be finished first."""

    name: str
    config: str
    overrides: tuple[str, ...]
    steps: int
    phase: str
    stops: tuple[int, ...] = ()
    branch: tuple[str, int] | None = None
    needs: tuple[str, ...] = ()
    sized: bool = True  # the recipe's model overrides apply (not to the baselines, which `dcdit baselines`
    # built from the overridden DC-DiT, nor to fine-tunes of the shipped checkpoint)


@dataclass(frozen=True)
class Evaluation:
    """Sample and score one model. ``step`` None: the run's final EMA weights; ``run`` "demo": the shipped checkpoint."""

    name: str
    run: str
    phase: str
    step: int | None = None
    tail: float = 0.0
    uncond_tail: float | None = None  # Lite-CFG


@dataclass(frozen=True)
class RouterAnalysis:
    name: str
    run: str
    phase: str


#: Timing groups: name -> (DC-DiT runs whose training step is timed, runs whose evaluations' sampling
#: steps are timed). A group needs only its own runs' weights, so each can be timed in the session
#: that trained them (a later session would have to retrain them: the record keeps no weights).
TIMING_GROUPS = {
    "main": (("dcdit_release_s0",), ("dcdit_release_s0", "demo")),
    "random": (("random_s0",), ("random_s0",)),
    "multibudget": ((), ("multibudget_s0",)),
    "dydit": (("dydit_demo", "demo_finetune"), ("dydit_demo", "demo_finetune", "demo")),
    "cosine": (("dcdit_cosine_s0",), ("dcdit_cosine_s0",)),
}
#: Timed in every group from their configs with fresh weights (a DiT's time does not depend on its
#: weights: no step of it depends on the data), so every group has its own baseline in its process.
TIMED_BASELINES = ("isoparam_s0", "isoflop_s0")


@dataclass(frozen=True)
class Timing:
    """One timing group: the DC-DiT runs whose training step and the evaluations whose sampling step
    are timed (from their weights), and the baseline runs timed from their configs."""

    name: str
    train: tuple[str, ...]
    sample: tuple[Evaluation, ...]
    baselines: tuple[Run, ...]
    phase: str = "timing"

    @property
    def needs(self) -> list[str]:
        """The runs whose final weights the group reads."""
        return sorted({*self.train, *(e.run for e in self.sample if e.run != "demo")})


def timing_tasks(plan: list) -> list[Timing]:
    """One :class:`Timing` per :data:`TIMING_GROUPS` entry whose runs are in the plan."""
    runs = {t.name: t for t in plan if isinstance(t, Run)}
    baselines = tuple(runs[n] for n in TIMED_BASELINES if n in runs)
    out = []
    for group, (train, sample) in TIMING_GROUPS.items():
        evals = tuple(t for t in plan if isinstance(t, Evaluation) and t.run in sample and t.step is None)
        if all(n in runs for n in train) and evals:
            out.append(Timing(f"timing_{group}", train, evals, baselines))
    return out


def weights_read(task) -> list[tuple[str, int | None]]:
    """(run, step) of every checkpoint ``task`` reads; step None: the run's final weights."""
    if isinstance(task, Evaluation):
        return [(task.run, task.step)] if task.run != "demo" else []
    if isinstance(task, RouterAnalysis):
        return [(task.run, None)] if task.run != "demo" else []
    if isinstance(task, Run):
        return ([task.branch] if task.branch else []) + [(n, None) for n in task.needs]
    if isinstance(task, Timing):
        return [(n, None) for n in task.needs]
    return []


def _common(r: Recipe, keep_last: int = 100) -> tuple[str, ...]:
    return (f"train.ckpt_every={r.ckpt_every}", f"train.keep_last={keep_last}", f"train.log_every={r.log_every}",
            *r.train_overrides)


def main_runs(out: Path, r: Recipe, seed: int) -> list[Run]:
    cfgs = out / "configs"
    stops = (r.multibudget_start,) if seed == 0 else ()
    base = (*_common(r), f"train.seed={seed}")
    return [Run(f"dcdit_release_s{seed}", "mnist-release", base, r.steps, "main", stops=stops),
            Run(f"isoparam_s{seed}", str(cfgs / "isoparam.yaml"), base, r.steps, "main", sized=False),
            Run(f"isoflop_s{seed}", str(cfgs / "isoflop.yaml"), base, r.steps, "main", sized=False)]


def random_run(r: Recipe, seed: int) -> Run:
    """The release-exact DC-DiT with the random router (claim (d)), on the same batches as dcdit_release_s{seed}."""
    return Run(f"random_s{seed}", "mnist-release", (*_common(r), f"train.seed={seed}", "model.router=random"), r.steps, "random")


def ablation_runs(out: Path, r: Recipe, demo: Path, demo_schedule: str) -> dict[str, list[Run]]:
    """phase -> runs of the single-seed ablations (seed 0)."""
    s0 = (*_common(r), "train.seed=0")
    fractions = "[" + ",".join(str(f) for f in RELEASE_FRACTIONS) + "]"
    up = (*s0, f"train.upcycle.from_dit={(out / 'isoparam_s0').resolve()}")
    demo_ft = (f"train.init_from={demo}", f"model.noise_schedule={demo_schedule}", "train.seed=0", "train.lr=1e-4",
               f"train.log_every={min(r.log_every, 10)}", f"train.ckpt_every={r.dydit_ckpt_every}", "train.keep_last=2",
               *r.train_overrides)
    return {
        "multibudget": [Run("multibudget_s0", "mnist-release",
                            (*s0, f"train.multi_budget.fractions={fractions}", f"train.multi_budget.start_step={r.multibudget_start}"),
                            r.steps, "multibudget", branch=("dcdit_release_s0", r.multibudget_start))],
        "upcycle": [Run("upcycle_s0", "mnist-release", up, r.upcycle_steps, "upcycle", needs=("isoparam_s0",)),
                    Run("upcycle_distill_s0", "mnist-release", (*up, f"train.upcycle.distill_steps={r.distill_steps}"),
                        r.upcycle_steps, "upcycle", needs=("isoparam_s0",))],
        # DyDiT's routers start with every gate on and get their own lr, 100x the rest, so a short fine-tune moves them
        "dydit": [Run("dydit_demo", "mnist", (*demo_ft, "model.dydit=true", "train.dydit_router_lr=1e-2", "train.dydit_target=0.7",
                                              f"train.dydit_warmup_steps={r.dydit_warmup_steps}"), r.dydit_steps, "dydit", sized=False),
                  Run("demo_finetune", "mnist", demo_ft, r.dydit_steps, "dydit", sized=False)],
        "cosine": [Run("dcdit_cosine_s0", "mnist", s0, r.steps, "cosine")],
    }


def upcycle_points(r: Recipe) -> list[int]:
    """The checkpoints evaluated for quality against training steps: every checkpoint of the upcycled
    runs (250, 500, 750 of 750 steps), and the from-scratch run at the same steps."""
    return list(range(r.ckpt_every, r.upcycle_steps + 1, r.ckpt_every))


def tasks(out: Path, r: Recipe, seeds: list[int], demo: Path, demo_schedule: str) -> list:
    """Everything, in the order that gives the most evidence first: the guidance scale, seed 0 of the
    main three (claim (a)), elastic inference and the router of that DC-DiT (claims (e), (b), (c)),
    the other seeds, the random router of every seed (d), multi-budget (e), upcycling, DyDiT, the
    cosine router, and the time per step of the finished models, one group at a time (``timing.py``)."""
    t: list = [("scale", None)]
    abl = ablation_runs(out, r, demo, demo_schedule)
    for i, seed in enumerate(seeds):
        runs = main_runs(out, r, seed)
        t += runs + [Evaluation(x.name, x.name, "main") for x in runs]
        if seed == 0:
            t += [Evaluation(f"dcdit_release_s0@tail{f}", "dcdit_release_s0", "elastic", tail=f) for f in TAILS[1:]]
            t.append(Evaluation("dcdit_release_s0@litecfg", "dcdit_release_s0", "elastic", tail=LITE_CFG[0], uncond_tail=LITE_CFG[1]))
        t.append(RouterAnalysis(f"dcdit_release_s{seed}", f"dcdit_release_s{seed}", "router"))
        if i == 0:
            t.append(RouterAnalysis("demo", "demo", "router"))
    for seed in seeds:
        t += [random_run(r, seed), Evaluation(f"random_s{seed}", f"random_s{seed}", "random")]
        if seed == 0:
            t.append(RouterAnalysis("random_s0", "random_s0", "router"))
    t += abl["multibudget"] + [Evaluation(f"multibudget_s0@tail{f}", "multibudget_s0", "multibudget", tail=f) for f in TAILS]
    t.append(Evaluation("multibudget_s0@litecfg", "multibudget_s0", "multibudget", tail=LITE_CFG[0], uncond_tail=LITE_CFG[1]))
    t += abl["upcycle"]
    for step in upcycle_points(r):
        t += [Evaluation(f"{n}@step{step}", n, "upcycle", step=step) for n in ("upcycle_s0", "upcycle_distill_s0")]
        t.append(Evaluation(f"dcdit_release_s0@step{step}", "dcdit_release_s0", "upcycle", step=step))
    t += abl["dydit"] + [Evaluation(n, n, "dydit") for n in ("demo", "dydit_demo", "demo_finetune")]
    t += abl["cosine"] + [Evaluation("dcdit_cosine_s0", "dcdit_cosine_s0", "cosine"),
                          RouterAnalysis("dcdit_cosine_s0", "dcdit_cosine_s0", "router")]
    return [*t, *timing_tasks(t)]


def task_phase(task) -> str:
    return "scale" if isinstance(task, tuple) else task.phase


def sized(run: Run, r: Recipe) -> Run:
    """The run with the recipe's model overrides (the smoke mode's tiny model) where they apply."""
    return dataclasses.replace(run, overrides=(*r.model_overrides, *run.overrides)) if run.sized else run


__all__ = [
    "GUIDANCE_SCALES",
    "LITE_CFG",
    "MAIN",
    "PHASES",
    "SMOKE",
    "TAILS",
    "Evaluation",
    "Recipe",
    "RouterAnalysis",
    "Run",
    "TIMED_BASELINES",
    "TIMING_GROUPS",
    "Timing",
    "ablation_runs",
    "main_runs",
    "random_run",
    "sized",
    "task_phase",
    "tasks",
    "timing_tasks",
    "upcycle_points",
    "weights_read",
]
