"""scripts/reproduce_mnist.py and scripts/mnist_study/: the Table-1 study's wiring (smoke mode end to
end, skipping what is done, resuming an interrupted run), its run plan, and its decision rules on
hand-made numbers."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import reproduce_mnist
from mnist_study import rules
from mnist_study.plan import (
    SMOKE,
    TIMED_BASELINES,
    TIMING_GROUPS,
    Evaluation,
    Recipe,
    RouterAnalysis,
    Run,
    Timing,
    tasks,
    upcycle_points,
    weights_read,
)
from mnist_study.record import compare_retrain, sync
from mnist_study.report import ELASTIC_BASELINES, elastic_rows, step_times, table1, upcycling_section
from mnist_study.timing import training_step
from mnist_study.training import StudyError, dcdit, train_run

from dcdit.checkpoint import read_weights
from dcdit.config import load_run_config
from dcdit.train import setup_run, train
from dcdit.train_log import TrainLogger
from dcdit.utils import cpu_info


def _log_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ end to end


def test_smoke_study_runs_end_to_end_and_a_later_session_resumes_from_the_record(tmp_path, capsys, monkeypatch):
    """Every phase wired on a tiny model: the report with its table, verdicts, plot and grids. Checks
    that the runs of a seed share seed and batch (the paired comparison's premise), that the
    multi-budget run is the DC-DiT up to its branch step and tail-drops after it, that a second
    invocation trains and samples nothing, and that a later session (a fresh study folder, only the
    record) skips what the record holds and retrains a run only as far as a missing task needs it."""
    out, record = tmp_path / "study", tmp_path / "record"
    argv = ["--smoke", "--seeds", "0", "--threads", "1", "--record"]
    assert reproduce_mnist.main(["--out", str(out), *argv, str(record)]) == 0
    first = capsys.readouterr().out
    md = (out / "results.md").read_text()
    for heading in ("## Table 1", "## Verdicts", "## Every evaluation", "## Paired training ε-MSE", "## Elastic inference",
                    "## Upcycling", "## DyDiT", "## Routers", "## Sample grids"):
        assert heading in md
    for claim in "abcde":
        assert f"- **({claim}) " in md
    assert (out / "elastic.png").stat().st_size > 0 and (out / "eval" / "isoflop_s0" / "grid.png").exists()
    assert (out / "upcycling.png").stat().st_size > 0 and (record / "upcycling.png").exists()
    assert (record / "router" / "dcdit_release_s0" / "retention_examples.png").exists()  # the pictures of (b)
    report = json.loads((out / "results.json").read_text())
    assert report["selection"]["cfg_scale"] in SMOKE.scales
    res = report["evaluations"]["dcdit_release_s0"]
    assert res["num_samples"] == 10 and res["cfg_scale"] == report["selection"]["cfg_scale"] and res["sampler"] == "ddpm"
    assert res["fid_ci"][0] <= res["fid_ci"][1] and res["acc_ci"][0] <= res["class_accuracy"] <= res["acc_ci"][1]
    assert report["evaluations"]["isoflop_s0"]["mean_kept"] is None and res["mean_kept"] > 0
    # the main three of seed 0: same seed and batch, the baselines at the DC-DiT's width
    cfgs = {n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in ("dcdit_release_s0", "isoparam_s0", "isoflop_s0")}
    assert {c["train"]["seed"] for c in cfgs.values()} == {0}
    assert {c["train"]["global_batch_size"] for c in cfgs.values()} == {8}
    assert {c["model"]["hidden_size"] for c in cfgs.values()} == {32}
    assert cfgs["isoflop_s0"]["model"]["depth"] > cfgs["isoparam_s0"]["model"]["depth"]
    # multi-budget: the DC-DiT's rows up to its branch step, tail-dropping only after it
    start = SMOKE.multibudget_start
    mb, dc = _log_rows(out / "multibudget_s0" / "log.csv"), _log_rows(out / "dcdit_release_s0" / "log.csv")
    assert [r for r in mb if int(r["step"]) <= start] == [r for r in dc if int(r["step"]) <= start]
    assert any(float(r["tail_fraction"]) > 0 for r in mb if int(r["step"]) > start)
    assert all(float(r["tail_fraction"]) == 0 for r in dc)
    assert "[train] dcdit_cosine_s0" in first
    _check_timing_groups(out, md, report)

    # a second invocation on the same folder does nothing
    marks = {p: p.stat().st_mtime_ns for p in out.glob("**/*") if p.name in ("result.json", "train_summary.json") or p.parent.name == "timing"}
    assert reproduce_mnist.main(["--out", str(out), *argv, str(record)]) == 0
    second = capsys.readouterr().out
    assert "to step" not in second and "chunk" not in second and "[router]" not in second and "[timing]" not in second
    assert marks == {p: p.stat().st_mtime_ns for p in marks}

    # a later session: a fresh folder and the record -> the same report, nothing trained or sampled
    assert not any(p.suffix == ".safetensors" for p in record.glob("**/*"))  # no weights in the record
    paused = tmp_path / "paused"  # a run paused at its branch step is not finished: not recorded
    shutil.copytree(out / "dcdit_release_s0", paused / "dcdit_release_s0", ignore=shutil.ignore_patterns("checkpoints"))
    (paused / "dcdit_release_s0" / "train_summary.json").write_text(json.dumps({"step": SMOKE.multibudget_start}))
    sync(paused, tmp_path / "paused_record", {"dcdit_release_s0": SMOKE.steps})
    assert not (tmp_path / "paused_record" / "dcdit_release_s0").exists()
    assert reproduce_mnist.main(["--out", str(tmp_path / "later"), *argv, str(record)]) == 0
    later = capsys.readouterr().out
    assert "restored" in later and "to step" not in later and "chunk" not in later and "[timing]" not in later
    header = 4  # title, blank, the study command, the invocation that wrote the report
    assert (tmp_path / "later" / "results.md").read_text().splitlines()[header:] == md.splitlines()[header:]

    # ... and with one recorded evaluation gone, the run it reads is trained again only to that step,
    # repeats the recorded run, gives the same evaluation, and leaves the record's full run alone
    partial = tmp_path / "record2"
    shutil.copytree(record, partial)
    shutil.rmtree(partial / "eval" / "dcdit_release_s0@step2")
    again = tmp_path / "again"
    verdict_lines, write_report = [], reproduce_mnist.write_report

    def spy(*args, **kwargs):  # every report, also those written while the retrain runs (main phase)
        path = write_report(*args, **kwargs)
        verdict_lines.append([line for line in path.read_text().splitlines() if line.startswith("- **(b)")])
        return path

    monkeypatch.setattr(reproduce_mnist, "write_report", spy)
    assert reproduce_mnist.main(["--out", str(again), *argv, str(partial)]) == 0
    # the recorded router analyses are in every report, not only in those written after the router phase
    assert len(verdict_lines) > 1 and all(v == verdict_lines[-1] for v in verdict_lines)
    assert "undecided" not in verdict_lines[-1][0]
    log = capsys.readouterr().out
    assert "dcdit_release_s0: recorded, its weights are not; trained again to step 2" in log
    trained = [line.split(";")[0] for line in log.splitlines() if ": to step" in line]  # through its stop at step 1
    assert trained == ["[train] dcdit_release_s0: to step 1", "[train] dcdit_release_s0: to step 2 (resumed)"]
    assert json.loads((again / "dcdit_release_s0" / "train_summary.json").read_text())["step"] == 2
    assert json.loads((again / "retrains.json").read_text())["dcdit_release_s0"].startswith("repeats the recorded run")
    old, new = (json.loads((r / "eval" / "dcdit_release_s0@step2" / "result.json").read_text()) for r in (record, partial))
    assert (new["mnist_fid"], new["class_accuracy"], new["fid_ci"]) == (old["mnist_fid"], old["class_accuracy"], old["fid_ci"])
    assert json.loads((partial / "dcdit_release_s0" / "train_summary.json").read_text())["step"] == SMOKE.steps


def _check_timing_groups(out: Path, md: str, report: dict) -> None:
    """The timing phase, group by group: each group's DC-DiT training steps, its evaluation settings'
    sampling steps and the two baselines; the report's time columns come from it, the ratios within a group."""
    timing = {p.stem: json.loads(p.read_text()) for p in (out / "timing").glob("*.json")}
    assert set(timing) == {f"timing_{g}" for g in TIMING_GROUPS}
    for name, (trained, sampled) in TIMING_GROUPS.items():
        g = timing[f"timing_{name}"]
        assert set(g["train_s_per_step"]) == {*trained, *TIMED_BASELINES}
        assert {n.split("@")[0] for n in g["sampling_s_per_step"]} == {*sampled, *TIMED_BASELINES}
        assert all(v > 0 for d in ("train_s_per_step", "sampling_s_per_step") for v in g[d].values())
        assert g["cpu"] == cpu_info()["model"]  # a record gathers groups timed on different machines
    main = timing["timing_main"]
    assert {"dcdit_release_s0@tail0.75", "dcdit_release_s0@litecfg", "demo"} <= set(main["sampling_s_per_step"])
    assert "multibudget_s0@tail0.5" in timing["timing_multibudget"]["sampling_s_per_step"]
    assert not any("@step" in n for g in timing.values() for n in g["sampling_s_per_step"])
    assert "Times: the timing phase" in md and report["timing"] == timing
    iso = next(line for line in md.splitlines() if line.startswith("| isoflop_s0 |"))
    assert iso.endswith(f"| {main['train_s_per_step']['isoflop_s0']:.3f} | 1.00 | {main['sampling_s_per_step']['isoflop_s0']:.3f} | 1.00 |")
    rnd = timing["timing_random"]
    row = next(line for line in md.splitlines() if line.startswith("| random_s0 |"))
    ratio = rnd["train_s_per_step"]["random_s0"] / rnd["train_s_per_step"]["isoflop_s0"]
    assert f"| {rnd['train_s_per_step']['random_s0']:.3f} | {ratio:.2f} |" in row


def test_an_interrupted_training_run_resumes_to_the_same_weights(tmp_path, capsys):
    """A run killed after a checkpoint (checkpoints, no train_summary.json) is continued with
    `dcdit train --resume`, not restarted: its early checkpoint stays untouched and the final EMA
    weights equal those of an uninterrupted run bit for bit."""
    r = SMOKE
    run = Run("dcdit_release_s0", "mnist-release", ("train.ckpt_every=2", "train.keep_last=100", "train.log_every=1",
                                                   *r.train_overrides, "train.seed=0"), 6, "main")
    train_run(tmp_path / "whole", run, r, 1)
    part = tmp_path / "part"
    train_run(part, Run(run.name, run.config, run.overrides, 4, "main"), r, 1)
    (part / run.name / "train_summary.json").unlink()  # as a SIGTERM'd run leaves it
    early = part / run.name / "checkpoints" / "0000002" / "model.safetensors"
    stamp = early.stat().st_mtime_ns
    capsys.readouterr()
    assert train_run(part, run, r, 1)
    assert "(resumed)" in capsys.readouterr().out
    assert early.stat().st_mtime_ns == stamp
    a = read_weights(tmp_path / "whole" / run.name / "checkpoints" / "0000006" / "ema.safetensors")[0]
    b = read_weights(part / run.name / "checkpoints" / "0000006" / "ema.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [int(x["step"]) for x in _log_rows(part / run.name / "log.csv")] == list(range(1, 7))


def test_the_timed_training_step_is_dcdit_trains_step(tmp_path):
    """What the timing phase times is the real step: two timed steps from a fresh run give the weights,
    EMA and optimizer state that `dcdit.train` gives after two steps, bit for bit (a timed step that
    skipped the ratio loss, the EMA or the step's own draws would differ)."""
    cfg = load_run_config("mnist-release", [*SMOKE.model_overrides, *SMOKE.train_overrides, "train.steps=2",
                                            "train.ckpt_every=100", "train.log_every=100"])
    train(cfg, tmp_path / "real", progress=False)
    real = read_weights(tmp_path / "real" / "checkpoints" / "0000002" / "ema.safetensors")[0]
    run = setup_run(cfg, tmp_path / "timed", resume=False, device="cpu")
    run.model.train()
    logger = TrainLogger(run.cfg, run.run_dir, run.dist, total_steps=2, start_step=0, resume_step=None, progress=False)
    training_step(run, logger)
    training_step(run, logger)
    logger.close()
    timed = run.ema.state_dict()
    assert run.step == 2 and real.keys() == timed.keys()
    assert all(torch.equal(real[k], timed[k]) for k in real)


def test_step_times_come_from_one_source():
    """Before the timing phase: the run's wall time per step and the evaluation's own sampling time;
    after it: only the timing phase's numbers (None where it timed nothing, never the wall time), the
    isoflop's from the group that timed the model (its own process), not from another group."""
    out = Path("/nonexistent")
    r = {"sampling_s_per_step": 0.5}
    assert step_times(out, "x_s1@tail0.5", r, {}) == (None, 0.5, None, None)
    timing = {"timing_main": {"train_s_per_step": {"dcdit_release_s0": 1.25, "isoflop_s0": 1.0},
                              "sampling_s_per_step": {"dcdit_release_s0@tail0.5": 0.25, "isoflop_s0": 0.2}},
              "timing_random": {"train_s_per_step": {"random_s0": 1.5, "isoflop_s0": 1.2},
                                "sampling_s_per_step": {"random_s0": 0.3, "isoflop_s0": 0.25}}}
    assert step_times(out, "dcdit_release_s0", r, timing) == (1.25, None, 1.0, 0.2)
    assert step_times(out, "dcdit_release_s0@tail0.5", r, timing) == (None, 0.25, 1.0, 0.2)
    assert step_times(out, "random_s0", r, timing) == (1.5, 0.3, 1.2, 0.25)
    assert step_times(out, "dcdit_release_s1", r, timing) == (None, None, None, None)


def test_elastic_rows_put_the_seed_0_baselines_next_to_the_settings():
    """The elastic plot's series: each DC-DiT's tail-drop fractions in order and Lite-CFG, then the seed-0
    isoparam / isoflop DiT/2 as reference points (not other seeds'; none while no setting is evaluated)."""
    score = lambda g: {"gflops_per_image": g, "mnist_fid": 10.0, "class_accuracy": 0.5}  # noqa: E731
    results = {"isoparam_s0": score(30), "isoflop_s0": score(55), "isoflop_s1": score(56)}
    assert elastic_rows(results) == {}
    results |= {"dcdit_release_s0@tail0.5": score(36), "dcdit_release_s0": score(57), "dcdit_release_s0@litecfg": score(41)}
    rows = elastic_rows(results)
    assert list(rows) == ["dcdit_release_s0", ELASTIC_BASELINES]
    assert [(s, r["gflops_per_image"]) for s, r in rows["dcdit_release_s0"]] == [("tail 0", 57), ("tail 0.5", 36), ("Lite-CFG 0/0.9", 41)]
    assert [(s, r["gflops_per_image"]) for s, r in rows[ELASTIC_BASELINES]] == [("isoparam", 30), ("isoflop", 55)]


def test_a_retrain_that_does_not_repeat_the_recorded_run_says_where_it_parts(tmp_path):
    header = "step,loss,mse,steps_per_s\n"
    (tmp_path / "recorded" / "x").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "recorded" / "x" / "log.csv").write_text(header + "1,0.5,0.4,1.0\n50,0.25,0.2,1.0\n100,0.125,0.1,1.0\n")
    (tmp_path / "x" / "log.csv").write_text(header + "1,0.5,0.4,2.0\n50,0.25,0.2000001,2.0\n")
    verdict = compare_retrain(tmp_path, "x")
    assert verdict.startswith("differs from the recorded run from step 50 on") and "1 of 2 logged steps" in verdict
    (tmp_path / "x" / "log.csv").write_text(header + "1,0.5,0.4,2.0\n50,0.25,0.2,3.0\n")  # the speed never counts
    assert compare_retrain(tmp_path, "x").startswith("repeats the recorded run")
    assert json.loads((tmp_path / "retrains.json").read_text())["x"].startswith("repeats")


def test_a_failing_dcdit_command_ends_in_one_line_naming_its_log(tmp_path):
    """The subprocess launcher (what the real study uses): a failure raises StudyError naming the log."""
    log = tmp_path / "logs" / "x.log"
    with pytest.raises(StudyError, match=r"exit code 2: see the end of .*x\.log"):
        dcdit(["train", "no-such-config"], log, Recipe(), 1)
    assert "no-such-config" in log.read_text()


# ---------------------------------------------------------------------------------------- the plan


def test_the_plan_trains_seed_0_of_the_main_three_first_and_the_cosine_router_last(tmp_path):
    plan = tasks(tmp_path, Recipe(), [0, 1, 2], Path("demo.safetensors"), "cosine")
    runs = [t.name for t in plan if isinstance(t, Run)]
    assert plan[0] == ("scale", None)
    assert runs[:3] == ["dcdit_release_s0", "isoparam_s0", "isoflop_s0"] and runs[-1] == "dcdit_cosine_s0"
    assert runs.index("isoflop_s2") < runs.index("random_s0")
    rnd = {t.name: t for t in plan if isinstance(t, Run) and t.phase == "random"}  # claim (d) on every seed, same batches
    assert sorted(rnd) == ["random_s0", "random_s1", "random_s2"]
    assert all({f"train.seed={k}", "model.router=random"} <= set(rnd[f"random_s{k}"].overrides) for k in range(3))
    assert [t.run for t in plan if isinstance(t, RouterAnalysis) and t.run.startswith("random")] == ["random_s0"]
    evals = [t.name for t in plan if isinstance(t, Evaluation)]
    assert evals.index("dcdit_release_s0@tail0.25") < evals.index("isoparam_s1")  # elastic evidence before the other seeds
    r = Recipe()
    assert (r.steps, r.ckpt_every, r.multibudget_start, r.upcycle_steps, upcycle_points(r)) == (3000, 250, 375, 750, [250, 500, 750])
    mb = next(t for t in plan if isinstance(t, Run) and t.name == "multibudget_s0")
    assert "train.multi_budget.fractions=[0.0,0.1,0.2,0.3,0.4,0.5,0.6]" in mb.overrides and mb.branch == ("dcdit_release_s0", 375)
    assert all(not any("noise_schedule=linear" in o for o in t.overrides) for t in plan if isinstance(t, Run))
    timing = {t.name: t for t in plan if isinstance(t, Timing)}  # after everything, a group at a time
    assert list(timing) == [f"timing_{g}" for g in TIMING_GROUPS] and all(isinstance(t, Timing) for t in plan[-len(timing):])
    assert timing["timing_main"].needs == ["dcdit_release_s0"] and timing["timing_dydit"].needs == ["demo_finetune", "dydit_demo"]
    assert all({b.name for b in t.baselines} == set(TIMED_BASELINES) for t in timing.values())
    assert weights_read(timing["timing_cosine"]) == [("dcdit_cosine_s0", None)]
    assert weights_read(mb) == [("dcdit_release_s0", 375)]
    assert weights_read(next(t for t in plan if isinstance(t, Evaluation) and t.name == "upcycle_s0@step500")) == [("upcycle_s0", 500)]
    assert weights_read(next(t for t in plan if isinstance(t, Run) and t.name == "upcycle_s0")) == [("isoparam_s0", None)]


# ------------------------------------------------------------------------------------- the rules


def score(fid, lo, hi, acc=0.9):
    return {"mnist_fid": fid, "fid_ci": (lo, hi), "class_accuracy": acc, "acc_ci": (acc - 0.02, acc + 0.02), "mnist_is": 8.0}


def test_guidance_scale_rule_prefers_accuracy_then_fid():
    rows = {1.5: {"class_accuracy": 0.80, "mnist_fid": 10.0}, 2.0: {"class_accuracy": 0.91, "mnist_fid": 30.0},
            3.0: {"class_accuracy": 0.93, "mnist_fid": 25.0}, 4.0: {"class_accuracy": 0.95, "mnist_fid": 40.0}}
    assert rules.choose_guidance_scale(rows)[0] == 3.0  # 0.93 is within 0.03 of 0.95 and has the lower FID
    rows[3.0]["class_accuracy"] = 0.90
    assert rules.choose_guidance_scale(rows)[0] == 4.0


def test_verdict_a():
    good, bad, mid = score(10, 8, 12), score(30, 27, 33), score(11, 9, 14)
    assert rules.verdict_a({0: {"dcdit_release": good, "isoparam": bad, "isoflop": bad},
                            1: {"dcdit_release": good, "isoparam": bad, "isoflop": bad}}).outcome == "holds"
    assert rules.verdict_a({0: {"dcdit_release": bad, "isoparam": good, "isoflop": mid},
                            1: {"dcdit_release": bad, "isoparam": good, "isoflop": bad}}).outcome == "does not hold"
    v = rules.verdict_a({0: {"dcdit_release": good, "isoparam": bad, "isoflop": mid}})
    assert v.outcome == "undecided" and "overlap" in v.reason
    # seeds disagree: better on one, worse on the other
    assert rules.verdict_a({0: {"dcdit_release": good, "isoparam": bad, "isoflop": bad},
                            1: {"dcdit_release": bad, "isoparam": good, "isoflop": good}}).outcome == "undecided"
    v = rules.verdict_a({0: {"dcdit_release": score(10, 8, 12, acc=0.1), "isoparam": bad, "isoflop": bad}})
    assert v.outcome == "undecided" and "does not draw digits" in v.reason
    assert rules.verdict_a({0: {"dcdit_release": good}}).outcome == "undecided"


def _retention(fg_low, bg_low, comp_high, comp_low):
    return [{"t": 999, "mean_fg_retention": 0.3, "mean_bg_retention": 0.2, "mean_compression_ratio": comp_high},
            {"t": 250, "mean_fg_retention": fg_low, "mean_bg_retention": bg_low, "mean_compression_ratio": comp_low},
            {"t": 100, "mean_fg_retention": fg_low, "mean_bg_retention": bg_low, "mean_compression_ratio": comp_low}]


def test_verdicts_b_and_c_on_router_tables():
    seg = _retention(0.99, 0.17, 5.0, 4.0)  # the demo checkpoint's numbers (docs/results.md)
    flat = _retention(0.36, 0.42, 4.0, 4.3)
    assert rules.verdict_b({"s0": seg, "s1": seg}).outcome == "holds"
    assert rules.verdict_b({"s0": flat}).outcome == "does not hold"
    assert rules.verdict_b({"s0": seg, "s1": flat}).outcome == "undecided"
    assert rules.verdict_b({"s0": _retention(0.22, 0.19, 5, 4)}).outcome == "undecided"  # below the margin
    assert rules.verdict_c({"s0": seg}).outcome == "holds"
    assert rules.verdict_c({"s0": flat}).outcome == "does not hold"
    assert rules.verdict_c({"s0": _retention(1, 0, 4.1, 4.0)}).outcome == "undecided"  # ×1.025 < ×1.05
    assert rules.verdict_b({}).outcome == rules.verdict_c({}).outcome == "undecided"


def test_verdict_d():
    good, bad, near = score(10, 8, 12), score(30, 27, 33), score(11, 9, 14)
    assert rules.verdict_d({0: (good, bad)}).outcome == "holds"
    assert rules.verdict_d({0: (bad, good)}).outcome == "does not hold"
    assert rules.verdict_d({0: (good, near)}).outcome == "undecided"
    assert rules.verdict_d({0: (good, bad), 1: (bad, good)}).outcome == "undecided"  # seeds disagree
    assert rules.verdict_d({0: (bad, good), 1: (bad, good)}).outcome == "does not hold"
    assert rules.verdict_d({0: (good, bad), 1: (good, None)}).outcome == "holds"  # seed 1 not evaluated yet
    assert rules.verdict_d({0: (good, None)}).outcome == "undecided"
    assert rules.verdict_d({0: (score(10, 8, 12, 0.2), bad)}).outcome == "undecided"  # learned draws no digits


def test_verdict_e():
    smooth = {0.0: score(10, 8, 12, 0.93), 0.25: score(12, 10, 14, 0.91), 0.5: score(16, 13, 19, 0.86), 0.75: score(60, 50, 70, 0.4)}
    assert rules.verdict_e(smooth, "m").outcome == "holds"  # f = 0.75 may break: the rule looks up to 0.5
    cliff = {**smooth, 0.25: score(80, 70, 90, 0.5)}
    assert rules.verdict_e(cliff, "m").outcome == "does not hold"
    between = {**smooth, 0.5: score(25, 20, 30, 0.75)}  # FID ×2.5, accuracy −0.18
    assert rules.verdict_e(between, "m").outcome == "undecided"
    assert rules.verdict_e({0.0: score(400, 380, 420, 0.1), 0.25: score(380, 360, 400, 0.1)}, "m").outcome == "undecided"


def test_table1_reports_mean_and_sample_std_over_seeds():
    """Catches a population std (ddof 0) or a mean over the wrong rows."""
    def res(fid, acc):
        return {"params": 820_000, "gflops_per_image": 11.0, "mnist_fid": fid, "class_accuracy": acc, "mnist_is": 8.0}
    results = {"dcdit_release_s0": res(10.0, 0.90), "dcdit_release_s1": res(14.0, 0.94), "isoparam_s0": res(30.0, 0.5),
               "random_s0": res(9.0, 0.91), "random_s1": res(12.0, 0.93), "random_s2": res(99.0, 0.1)}
    lines = table1(results, {"dcdit_release_s0": 0.030, "dcdit_release_s1": 0.032}, [0, 1])
    dc = next(l for l in lines if l.startswith("| DC-DiT (release-exact)"))
    assert "| 2 |" in dc and "12.0 ± 2.8" in dc and "0.920 ± 0.028" in dc and "0.0310 ± 0.0014" in dc
    assert "| 30.0 |" in next(l for l in lines if l.startswith("| DiT/2 isoparam"))
    assert "| 2 |" in (rnd := next(l for l in lines if l.startswith("| DC-DiT, random router"))) and "10.5 ± 2.1" in rnd  # seeds asked only


def _write_log(folder: Path, rows: list[tuple]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "log.csv", "w", newline="") as f:
        csv.writer(f).writerows([("step", "mse", "distill_loss"), *rows])


def test_upcycling_section_reads_the_diffusion_steps_and_counts_the_from_scratch_steps(tmp_path):
    """Closed-form curves (ε-MSE 1/s). Catches distillation rows (logged ε-MSE 0) averaged in, a window
    off by one step, a wrong count of the from-scratch steps that reach the upcycled run's loss, and a
    "reached" that reads the wrong side of the intervals."""
    r = Recipe(steps=60)  # points 5, 10, 15 of 15 upcycling steps; ε-MSE window 2 steps; 6 distillation steps
    assert (upcycle_points(r), r.upcycle_mse_window, r.distill_steps) == ([5, 10, 15], 2, 6)
    _write_log(tmp_path / "dcdit_release_s0", [(s, 1 / s, 0) for s in range(1, 61)])
    _write_log(tmp_path / "upcycle_s0", [(s, 1 / (s + 20), 0) for s in range(1, 16)])
    _write_log(tmp_path / "upcycle_distill_s0", [(s, 0.0, 0.5) for s in range(1, 7)] + [(s, 1 / s, 0) for s in range(7, 16)])

    def score(lo, hi):
        return {"mnist_fid": (lo + hi) / 2, "fid_ci": (lo, hi), "class_accuracy": 0.9, "acc_ci": (0.85, 0.95), "step": 60}
    results = {"dcdit_release_s0": score(10, 12), "upcycle_s0@step5": score(50, 60), "upcycle_s0@step10": score(11, 13),
               "upcycle_distill_s0@step15": score(13, 14)}
    lines = upcycling_section(results, tmp_path, r, plot=True)
    row = {l.split(" | ")[0]: l.split(" | ") for l in lines if l.startswith("| ")}
    assert row["| 5"][-1] == "– |" and row["| 10"][-1] == f"{(1 / 9 + 1 / 10) / 2:.4f} |"  # steps 9, 10 only
    assert row["| 10"][6] == f"{(1 / 29 + 1 / 30) / 2:.4f}"
    text = "\n".join(lines)
    # upcycled: mean(1/34, 1/35) at step 15, reached from scratch at step 35; distilled: 1/14, 1/15 at step 15
    assert "`upcycle_s0`'s ε-MSE at step 15 (0.0290) is reached from scratch at step 35 (2.3× the steps)" in text
    assert "`upcycle_distill_s0`'s ε-MSE at step 15 (0.0690) is reached from scratch at step 15 (1.0× the steps)" in text
    assert "`upcycle_s0` reaches the from-scratch 60-step MNIST-FID interval (overlapping or below) at step 10." in text
    assert "`upcycle_distill_s0` reaches the from-scratch 60-step MNIST-FID interval (overlapping or below) at none of steps [15]" in text
    assert (tmp_path / "upcycling.png").stat().st_size > 0 and "![quality against training steps](upcycling.png)" in text


def test_a_chunk_is_claimed_by_one_live_process_at_a_time(tmp_path):
    """Two processes evaluating one model share its chunks: a live process's fresh claim holds, a
    dead process's or an hour-old claim is taken over (a claim that never expired would stall the
    evaluation forever)."""
    import os
    import subprocess
    import time

    from mnist_study.evaluation import STALE_CLAIM_S, claim

    chunk = tmp_path / "chunk_000.npz"
    mark = chunk.with_suffix(".claim")
    assert claim(chunk) and mark.read_text() == str(os.getpid())
    mark.write_text(str(os.getppid()))  # another live process
    assert not claim(chunk) and mark.read_text() == str(os.getppid())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mark.write_text(str(dead.pid))
    assert claim(chunk) and mark.read_text() == str(os.getpid())
    mark.write_text(str(os.getppid()))
    old = time.time() - STALE_CLAIM_S - 1
    os.utime(mark, (old, old))
    assert claim(chunk) and mark.read_text() == str(os.getpid())
