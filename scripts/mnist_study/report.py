"""``<out>/results.md`` and ``results.json``: the Table-1-shaped table (mean ± std over seeds), the
per-model detail with bootstrap intervals, compute and time next to the FLOP ratio, the paired
training ε-MSE, the verdicts on claims (a)–(e) (:mod:`.rules`), elastic inference and upcycling (each
with its plot, :mod:`.figures`), DyDiT, the router tables, sample grids, the command and the machine.
Written from whatever is finished, so it can be read at any point of the study."""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from dcdit.utils import atomic_write_text, cpu_info

from .figures import elastic_plot, upcycling_plot
from .plan import LITE_CFG, TAILS, TIMED_BASELINES, TIMING_GROUPS, Recipe, upcycle_points
from .record import mse_curve, run_folder
from .rules import ci_order, first_step_reaching, verdict_a, verdict_b, verdict_c, verdict_d, verdict_e, window_mean

TABLE1 = [("DC-DiT (release-exact)", "dcdit_release"), ("DiT/2 isoparam", "isoparam"), ("DiT/2 isoflop", "isoflop"),
          ("DC-DiT, random router", "random")]
ABLATIONS = [("DC-DiT, multi-budget", "multibudget_s0@tail0.0"),
             ("DC-DiT, cosine router (paper text)", "dcdit_cosine_s0")]


def load_results(out: Path, order: list[str] = ()) -> dict[str, dict]:
    """Every finished evaluation, in the plan's ``order`` (others after it, by name)."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "eval").glob("*/result.json"))}
    rank = {n: i for i, n in enumerate(order)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def run_of(eval_name: str) -> str:
    return eval_name.split("@")[0]


def train_summary(out: Path, run: str) -> dict | None:
    p = run_folder(out, run) / "train_summary.json"
    return json.loads(p.read_text()) if p.exists() else None


def load_timing(out: Path) -> dict[str, dict]:
    """group -> the timing phase's result for it (``timing.py``; empty before any group has run), in
    :data:`TIMING_GROUPS`' order: the baselines' own rows take the main group's times."""
    rank = {f"timing_{g}": i for i, g in enumerate(TIMING_GROUPS)}
    files = sorted((out / "timing").glob("*.json"), key=lambda p: (rank.get(p.stem, len(rank)), p.stem))
    return {p.stem: json.loads(p.read_text()) for p in files}


def step_times(out: Path, name: str, r: dict | None, timing: dict[str, dict]) -> tuple:
    """(training s / step, sampling s / step, the same two of the isoflop DiT/2) for evaluation ``name``.
    Once any timing group has run, only timing numbers (one process, interleaved rounds; the isoflop's
    from the same group, so every ratio is within one process; None for what no group timed). Before,
    the run's wall time and the evaluation's own sampling time (a shared CPU: indicative only), the
    isoflop's of the same seed. Never mixed."""
    if timing:
        g = next((g for g in timing.values() if name in g["sampling_s_per_step"] or name in g["train_s_per_step"]), None)
        if g is None:
            return None, None, None, None
        train = g["train_s_per_step"].get(run_of(name)) if "@" not in name else None
        iso = TIMED_BASELINES[-1]
        return train, g["sampling_s_per_step"].get(name), g["train_s_per_step"].get(iso), g["sampling_s_per_step"].get(iso)

    def wall(n: str, res: dict | None) -> tuple[float | None, float | None]:
        ts = train_summary(out, run_of(n))
        train = ts["wall_time_s"] / ts["step"] if ts and ts["step"] and "@" not in n else None
        return train, None if res is None else res["sampling_s_per_step"]

    iso = f"isoflop_s{run_of(name).rsplit('_s', 1)[-1]}"
    iso_file = out / "eval" / iso / "result.json"
    return (*wall(name, r), *wall(iso, json.loads(iso_file.read_text()) if iso_file.exists() else None))


def times_note(timing: dict[str, dict]) -> str:
    if not timing:
        return ("Times: the runs' wall time per step and the evaluations' own sampling time, on a CPU shared with the "
                "rest of the study: indicative only until the timing phase has run.")
    g = next(iter(timing.values()))
    sp = g["sampling"]
    groups = ", ".join(f"{n} ({t.get('cpu', 'CPU not recorded')})" for n, t in timing.items())
    return (f"Times: the timing phase (scripts/mnist_study/timing.py), group by group ({groups}): each group's "
            f"models and the isoparam / isoflop DiT/2 (from their configs) in one process with {g['threads']} thread(s), "
            f"{g['rounds']} interleaved rounds after {g['warmup_rounds']} warm-up, medians; ratios within a group. A training "
            f"step is dcdit.train's step from the run's final weights, a sampling step one step of guided {sp['sampler'].upper()} "
            f"(scale {sp['cfg_scale']:g}) on {10 * sp['per_class']} samples over a {sp['steps']}-step trajectory. Seed-0 "
            "models only (the other seeds have the same architectures).")


def window_mse(out: Path, run: str, end: int, window: int) -> float | None:
    """Mean logged ε-MSE of ``run`` over steps (end − window, end]: the same steps, hence the same
    batches, timesteps and noise, for every run of a seed."""
    return window_mean(mse_curve(out, run), end, window)


def _ci(r: dict, key: str, ci: str, digits: int) -> str:
    lo, hi = r[ci]
    return f"{r[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _seconds(s: float | None) -> str:
    return "" if s is None else f"{s:.3f}"


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table1(results: dict, mse: dict, seeds: list[int]) -> list[str]:
    """Mean ± std over the seeds evaluated (sample std, n − 1); the other ablations are one seed."""
    lines = ["| model | seeds | params (M) | GFLOPs / img | MNIST-FID ↓ | class accuracy ↑ | IS-style ↑ | paired ε-MSE ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(label, [f"{key}_s{s}" for s in seeds]) for label, key in TABLE1] + [(label, [name]) for label, name in ABLATIONS]
    for label, names in rows:
        rs = [(n, results[n]) for n in names if n in results]
        if not rs:
            continue
        col = {k: [r[k] for _, r in rs] for k in ("gflops_per_image", "mnist_fid", "class_accuracy", "mnist_is")}
        m = [mse[run_of(n)] for n, _ in rs if mse.get(run_of(n)) is not None]
        lines.append(f"| {label} | {len(rs)} | {rs[0][1]['params'] / 1e6:.2f} | {_mean_std(col['gflops_per_image'], 2)} | "
                     f"{_mean_std(col['mnist_fid'], 1)} | {_mean_std(col['class_accuracy'], 3)} | {_mean_std(col['mnist_is'], 2)} | "
                     f"{_mean_std(m, 4)} |")
    return lines


def detail_table(results: dict, out: Path, timing: dict | None) -> list[str]:
    """Every evaluation with its intervals, compute, and times next to the ratios to the isoflop DiT of its seed."""
    lines = [times_note(timing), "", ("| evaluation | step | MNIST-FID [95% CI] | class acc [95% CI] | IS [95% CI] | tokens kept / L | GFLOPs / img | "
              "FLOPs ÷ isoflop | train s / step | ÷ isoflop | sampling s / step | ÷ isoflop |"), "|" + "---|" * 12]
    for name, r in results.items():
        iso = results.get(f"isoflop_s{run_of(name).rsplit('_s', 1)[-1]}")
        train_step, sample_step, iso_step, iso_sample = step_times(out, name, r, timing)

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else ""

        kept = f"{r['mean_kept']:.1f} / {r['tokens']}" if r["mean_kept"] is not None else "fixed patches"
        lines.append(f"| {name} | {r['step']} | {_ci(r, 'mnist_fid', 'fid_ci', 1)} | {_ci(r, 'class_accuracy', 'acc_ci', 3)} | "
                     f"{_ci(r, 'mnist_is', 'is_ci', 2)} | {kept} | {r['gflops_per_image']:.2f} | "
                     f"{ratio(r['gflops_per_image'], iso and iso['gflops_per_image'])} | "
                     f"{_seconds(train_step)} | {ratio(train_step, iso_step)} | {_seconds(sample_step)} | {ratio(sample_step, iso_sample)} |")
    return lines


def paired_mse(out: Path, runs: list[str], recipe: Recipe) -> tuple[dict, list[str]]:
    """{run: ε-MSE over the last ``mse_window`` steps} and its table against the DC-DiT of the same seed."""
    mse, lines = {}, [(f"| run | steps | ε-MSE, steps {recipe.steps - recipe.mse_window + 1}–{recipe.steps} | paired DC-DiT | "
                       "its ε-MSE, same steps | difference |"), "|---|---|---|---|---|---|"]
    for run in runs:
        ts = train_summary(out, run)
        if ts is None or ts["step"] < recipe.steps:
            continue
        mse[run] = window_mse(out, run, recipe.steps, recipe.mse_window)
        ref = f"dcdit_release_s{run.rsplit('_s', 1)[-1]}"
        ref_mse = window_mse(out, ref, recipe.steps, recipe.mse_window)
        if mse[run] is None:
            continue
        diff = f"{100 * (mse[run] / ref_mse - 1):+.1f}%" if ref_mse else ""
        lines.append(f"| {run} | {ts['step']} | {mse[run]:.4f} | {ref} | {'' if ref_mse is None else f'{ref_mse:.4f}'} | {diff} |")
    return mse, lines


def verdicts(results: dict, routers: dict, seeds: list[int]) -> list:
    per_seed = {s: {k: results[f"{k}_s{s}"] for k in ("dcdit_release", "isoparam", "isoflop") if f"{k}_s{s}" in results}
                for s in seeds}
    dc_routers = {n: ra["retention"] for n, ra in routers.items() if n.startswith("dcdit_release")}
    elastic_model = "multibudget_s0" if "multibudget_s0@tail0.0" in results else "dcdit_release_s0"
    curve = {f: results[tail_name(elastic_model, f)] for f in TAILS if tail_name(elastic_model, f) in results}
    return [verdict_a(per_seed), verdict_b(dc_routers), verdict_c(dc_routers),
            verdict_d({s: (results.get(f"dcdit_release_s{s}"), results.get(f"random_s{s}")) for s in seeds}),
            verdict_e(curve, elastic_model)]


def tail_name(model: str, f: float) -> str:
    """The evaluation of ``model`` at tail-drop fraction f (dcdit_release_s0 at f = 0 is its main evaluation)."""
    return model if (model == "dcdit_release_s0" and f == 0) else f"{model}@tail{f}"


#: The reference points of the elastic plot: a DC-DiT setting to the left of a baseline with better
#: quality gives that quality for fewer FLOPs than a DiT/2 of the same seed.
ELASTIC_BASELINES = "DiT/2 baselines (seed 0)"


def elastic_rows(results: dict) -> dict[str, list[tuple[str, dict]]]:
    """model -> [(setting, score)] of tail-drop fractions and Lite-CFG, then the seed-0 DiT/2 baselines."""
    rows = {}
    for model in ("dcdit_release_s0", "multibudget_s0"):
        pts = [(f"tail {f:g}", results[tail_name(model, f)]) for f in TAILS if tail_name(model, f) in results]
        if f"{model}@litecfg" in results:
            pts.append((f"Lite-CFG {LITE_CFG[0]:g}/{LITE_CFG[1]:g}", results[f"{model}@litecfg"]))
        if pts:
            rows[model] = pts
    baselines = [(name.split("_")[0], results[name]) for name in TIMED_BASELINES if name in results]
    if rows and baselines:
        rows[ELASTIC_BASELINES] = baselines
    return rows


def _score_cells(r: dict | None) -> str:
    if r is None:
        return "– | –"
    return f"{_ci(r, 'mnist_fid', 'fid_ci', 1)} | {_ci(r, 'class_accuracy', 'acc_ci', 3)}"


#: §4.4's runs: label -> run. The upcycled runs start from isoparam_s0's final weights (plan.py).
UPCYCLING = {"from scratch": "dcdit_release_s0", "upcycled": "upcycle_s0", "upcycled + distillation": "upcycle_distill_s0"}


def upcycling_section(results: dict, out: Path, recipe: Recipe, plot: bool) -> list[str]:
    """Quality against training steps: the evaluated checkpoints' scores and each run's training ε-MSE
    up to them (same seed: same batches, timesteps and noise), whether the upcycled runs reach the
    from-scratch run's final MNIST-FID, and how many from-scratch steps their final ε-MSE is worth."""
    points, w = upcycle_points(recipe), recipe.upcycle_mse_window
    curves = {label: mse_curve(out, run) for label, run in UPCYCLING.items()}
    scores = {label: {s: results[f"{run}@step{s}"] for s in points if f"{run}@step{s}" in results} for label, run in UPCYCLING.items()}
    lines = ["| step | " + " | ".join(f"{label}: MNIST-FID | accuracy | ε-MSE" for label in UPCYCLING) + " |", "|---" * 10 + "|"]
    for step in points:
        cells = []
        for label in UPCYCLING:
            cells.append(f"{_score_cells(scores[label].get(step))} | {_mean_cell(window_mean(curves[label], step, w))}")
        lines.append(f"| {step} | {' | '.join(cells)} |")
    final, scratch = results.get(UPCYCLING["from scratch"]), curves["from scratch"]
    lines.append(f"| {recipe.steps} (from scratch, end) | {_score_cells(final)} | "
                 f"{_mean_cell(window_mean(scratch, recipe.steps, w))} | | | | | | |")
    lines += ["", f"ε-MSE: the mean logged training ε-MSE over the {w} steps up to the point (–: none logged, as in a "
                  f"distillation warm-up, which trains on the teacher's activations; its {recipe.distill_steps} steps count "
                  "in the run's steps). The upcycled runs also reuse isoparam_s0's "
                  f"{recipe.steps} steps, which §4.4 counts as the pretrained model's, not the DC-DiT's."]
    for label, run in list(UPCYCLING.items())[1:]:
        done = sorted(scores[label])
        if final and done:  # §4.4's question: is the from-scratch quality reached in fewer steps?
            reached = [s for s in done if ci_order(scores[label][s], final) != "above"]
            lines += ["", f"`{run}` reaches the from-scratch {recipe.steps}-step MNIST-FID interval (overlapping or below) "
                          + (f"at step {reached[0]}" if reached else f"at none of steps {done}") + "."]
        end = window_mean(curves[label], recipe.upcycle_steps, w)
        if end is not None and scratch:
            at = first_step_reaching(scratch, end, w)
            lines += ["", f"`{run}`'s ε-MSE at step {recipe.upcycle_steps} ({end:.4f}) is reached from scratch "
                          + (f"at step {at} ({at / recipe.upcycle_steps:.1f}× the steps)." if at else
                             f"in none of its {max(scratch)} steps.")]
    drawn = plot and upcycling_plot(curves, scores, final, out / "upcycling.png")
    if drawn or (not plot and (out / "upcycling.png").exists()):
        lines += ["", "![quality against training steps](upcycling.png)"]
    return lines


def _mean_cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def dydit_table(results: dict, out: Path, timing: dict | None) -> list[str]:
    lines = ["Times as in *Every evaluation* (the dydit timing group).", "", "| model | GFLOPs / img | sampling s / step | fine-tune s / step | MNIST-FID [95% CI] | class acc [95% CI] |",
             "|---|---|---|---|---|---|"]
    for name in ("demo", "demo_finetune", "dydit_demo"):
        if name in results:
            r = results[name]
            train_step, sample_step, _, _ = step_times(out, name, r, timing)
            lines.append(f"| {name} | {r['gflops_per_image']:.2f} | {_seconds(sample_step)} | {_seconds(train_step)} | "
                         f"{_score_cells(r)} |")
    return lines


def router_tables(routers: dict) -> list[str]:
    lines = []
    for name, ra in routers.items():
        lines += ["", f"Router `{name}`: foreground / background tokens kept on held-out digits noised to t", "",
                  "| t | fg kept | bg kept | fg share of kept (image fg share) | compression |", "|---|---|---|---|---|"]
        lines += [f"| {r['t']} | {r['mean_fg_retention']:.3f} | {r['mean_bg_retention']:.3f} | {r['mean_fg_share_of_kept']:.3f} "
                  f"({r['mean_fg_fraction']:.3f}) | {r['mean_compression_ratio']:.2f} |" for r in ra["retention"]]
    return lines


def machine() -> str:
    """This invocation's machine (a record gathers several: each timing group names its own CPU)."""
    return (f"{platform.node()}: {cpu_info()['model']}, {os.cpu_count()} CPU cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) in that process")


def write_report(out: Path, recipe: Recipe, seeds: list[int], command: str, selection: dict | None, routers: dict,
                 train_runs: list[str], eval_order: list[str] = (), plot: bool = True) -> Path:
    """results.md and results.json; ``plot=False`` keeps the plots as they are (drawing them takes seconds)."""
    results, timing = load_results(out, eval_order), load_timing(out)
    mse, mse_lines = paired_mse(out, train_runs, recipe)
    verdict_list = verdicts(results, routers, seeds)
    rows = elastic_rows(results)
    elastic = elastic_plot(rows, out / "elastic.png") if plot else ("elastic.png" if (out / "elastic.png").exists() else None)
    sel = (f"DDPM {recipe.sampling_steps} steps, guidance scale **{selection['cfg_scale']:g}**, chosen on "
           f"{selection['samples']} samples of the shipped demo checkpoint (seed {selection['seed']}, none of the compared "
           f"runs and none of their samples): {selection['rule']}." if selection else "guidance scale not selected yet.")
    md = ["# Table 1 at MNIST scale (issue 20)", "",
          "Command: `python scripts/reproduce_mnist.py --out runs/table1 --record docs/results/table1` (resumable, "
          "and it may be split between processes with `--only` / `--runs`; every evaluation records its threads, "
          "every timing group its threads and CPU)  ",
          f"This report was last written by `{command}` on {machine()}  ",
          f"Recipe: configs/mnist.yaml / mnist-release.yaml, {recipe.steps} steps, same seed → same batches, timesteps and noise.  ",
          (f"Evaluation: {10 * recipe.samples_per_class} samples per model ({recipe.samples_per_class} per class), {sel} "
           f"EMA weights; MNIST-FID against the 500 held-out digits, class accuracy and IS-style score from the packaged "
           f"classifier, 95% percentile-bootstrap intervals over the samples ({recipe.bootstrap} resamples; a resample's "
           f"repeated digits raise MNIST-FID, so its interval can sit above the point value: compare intervals with "
           f"intervals)."), "",
          "## Table 1 (mean ± std over seeds)", "", *table1(results, mse, seeds), "",
          "## Verdicts", "", *[f"- **({v.claim}) {v.outcome}**: {v.reason}" for v in verdict_list], "",
          "## Every evaluation", "", *detail_table(results, out, timing), "",
          "## Paired training ε-MSE", "", *mse_lines, "",
          "## Elastic inference", ""]
    for model, pts in rows.items():
        md += [f"`{model}`: " + "; ".join(f"{s}: {r['gflops_per_image']:.2f} GFLOPs, MNIST-FID {r['mnist_fid']:.1f}, "
                                          f"accuracy {r['class_accuracy']:.3f}" for s, r in pts), ""]
    if elastic:
        md += [f"![quality against measured FLOPs]({elastic})", ""]
    md += ["## Upcycling (§4.4)", "", *upcycling_section(results, out, recipe, plot), "", "## DyDiT (§4.5)", "", *dydit_table(results, out, timing), "",
           "## Routers", *router_tables(routers), "", "## Sample grids (columns = classes 0–9)", ""]
    md += [f"`{n}`: ![]({Path('eval') / n / 'grid.png'})  " for n in results if (out / "eval" / n / "grid.png").exists()]
    path = out / "results.md"
    atomic_write_text(path, "\n".join(md) + "\n")  # readable while the study runs, never half-written
    atomic_write_text(out / "results.json", json.dumps({
        "command": command, "machine": machine(), "recipe": asdict(recipe), "seeds": seeds, "selection": selection,
        "evaluations": results, "paired_mse": mse, "verdicts": [asdict(v) for v in verdict_list],
        "routers": {n: ra["retention"] for n, ra in routers.items()}, "timing": timing}, indent=2))
    return path
