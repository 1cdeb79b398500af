"""The training loop end to end on CPU: checkpoints, exact resume after a kill, DDP = one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcdit.config import load_run_config
from dcdit.train import EpochOrder, train

TINY = [
    "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
    "train.global_batch_size=8", "train.ratio_batch_size=4", "train.log_every=2", "train.ckpt_every=2",
    "train.tensorboard=false", "train.lr=1e-3",
]


# `dcdit ...` in a subprocess that SIGKILLs itself right after the optimizer has applied step {step}
# (the training loop itself has no test hook; this patches its optimizer update from outside).
KILLED_AFTER_STEP = """
import os, signal, sys
import dcdit.train as T
real = T.optimizer_update
def update_then_die(run, loss_ok):
    out = real(run, loss_ok)
    if run.step + 1 == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
T.optimizer_update = update_then_die
from dcdit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args, env_extra=None, check=True, nproc=None, kill_after_step=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "dcdit.cli", *args]
    elif kill_after_step is not None:
        cmd = [sys.executable, "-c", KILLED_AFTER_STEP.format(step=kill_after_step), *args]
    else:
        cmd = [sys.executable, "-m", "dcdit.cli", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def weights(run_dir: Path, step: int, which="model") -> dict:
    return load_file(str(run_dir / "checkpoints" / f"{step:07d}" / f"{which}.safetensors"))


def test_epoch_order_is_a_permutation_per_epoch():
    order = EpochOrder(10, seed=3)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert first.tolist() != second.tolist()  # reshuffled each epoch
    assert order.indices(7, 6).tolist() == first[7:].tolist() + second[:3].tolist()  # crosses the epoch boundary


def test_train_writes_checkpoints_logs_and_config(tmp_path):
    cfg = load_run_config("mnist", TINY + ["train.steps=4"])
    summary = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert summary["step"] == 4 and summary["skipped_steps"] == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["0000002", "0000004"]
    for f in ("model.safetensors", "ema.safetensors", "training_state.pt", "config.yaml"):
        assert (run / "checkpoints" / "0000004" / f).exists()
    saved = load_run_config(run / "config.yaml")
    assert saved == cfg  # the resolved config round-trips
    rows = (run / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    for key in ("loss", "diffusion_loss", "ratio_loss", "compression_mean", "compression_std", "compression_min",
                "compression_max", "grad_norm", "steps_per_s"):
        assert key in header
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "4"]
    # the EMA differs from the raw weights after training, and both hold finite values
    raw, ema = weights(run, 4), weights(run, 4, "ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert all(torch.isfinite(v).all() for v in raw.values())


def test_existing_run_without_resume_is_refused(tmp_path):
    cfg = load_run_config("mnist", TINY + ["train.steps=2"])
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)


def test_resume_with_a_different_model_is_refused(tmp_path):
    train(load_run_config("mnist", TINY + ["train.steps=2"]), tmp_path / "run", progress=False)
    other = load_run_config("mnist", TINY + ["train.steps=4", "model.depth=2"])
    with pytest.raises(ValueError, match=r"model config differs.*model\.depth: 1 in the run, 2 now.*config\.yaml"):
        train(other, tmp_path / "run", resume=True, progress=False)
    own = load_run_config(str(tmp_path / "run" / "config.yaml"), ["train.steps=4"])  # the fix the message gives
    assert train(own, tmp_path / "run", resume=True, progress=False)["step"] == 4


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after step 5 (last checkpoint at 4); --resume must reproduce the uninterrupted run bit for bit."""
    args = ["train", "mnist", *TINY, "train.steps=6", "--no-progress"]
    run_cli([*args, "--out", str(tmp_path / "straight")])
    killed = run_cli([*args, "--out", str(tmp_path / "killed")], kill_after_step=5, check=False)
    assert killed.returncode == -9  # it really died, by SIGKILL
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "0000004"
    run_cli([*args, "--out", str(tmp_path / "killed"), "--resume"])
    steps = [int(r.split(",")[0]) for r in (tmp_path / "killed" / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # rows logged after the checkpoint were replaced
    a, b = weights(tmp_path / "straight", 6), weights(tmp_path / "killed", 6)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea, eb = weights(tmp_path / "straight", 6, "ema"), weights(tmp_path / "killed", 6, "ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def assert_same_adam_training(a: dict, b: dict, lr: float, steps: int) -> None:
    """Two runs that sum the same per-sample gradients in a different order (fp32 rounding ~1e-7).

    Adam normalises each coordinate, so where a gradient is itself at rounding level its sign can
    differ and that coordinate moves by up to lr per step in either run. So: no coordinate differs
    by more than 2·lr·steps (Adam's bound), and all but a handful (< 0.1%) agree to 1e-4. A real
    mismatch (other data, noise or batch) moves most coordinates by ~lr.
    """
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs().flatten() for k in a}
    diff = torch.cat(list(diffs.values()))
    assert diff.max() <= 2 * lr * steps, max(diffs, key=lambda k: diffs[k].max())
    assert (diff > 1e-4).float().mean() < 1e-3, f"{int((diff > 1e-4).sum())} of {diff.numel()} coordinates differ"


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 gloo ranks × micro-batch 4 = 1 process × batch 8: ranks stay identical and match the single run."""
    args = ["train", "mnist", *TINY, "train.steps=3", "train.ckpt_every=3", "--no-progress"]
    run_cli([*args, "--out", str(tmp_path / "single")])
    run_cli([*args, "--out", str(tmp_path / "ddp")], nproc=2)
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["rank_param_max_abs_diff"] == 0.0
    a, b = weights(tmp_path / "single", 3), weights(tmp_path / "ddp", 3)
    assert_same_adam_training(a, b, lr=1e-3, steps=3)
    # and the two runs did train (weights moved away from the step-0 initialisation)
    assert any(not torch.equal(a[k], weights(tmp_path / "single", 3, "ema")[k]) for k in a)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    base = TINY + ["train.steps=2", "train.ckpt_every=2"]
    train(load_run_config("mnist", base), tmp_path / "full", progress=False)
    train(load_run_config("mnist", base + ["train.micro_batch_size=4"]), tmp_path / "accum", progress=False)
    assert_same_adam_training(weights(tmp_path / "full", 2), weights(tmp_path / "accum", 2), lr=1e-3, steps=2)


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch):
    """A NaN loss must not reach the optimizer: the step is skipped, counted and logged."""
    import dcdit.train as T

    real = T.ratio_loss
    calls = {"n": 0}

    def nan_on_second_step(record, *a, **k):
        calls["n"] += 1
        out = real(record, *a, **k)
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(T, "ratio_loss", nan_on_second_step)
    summary = train(load_run_config("mnist", TINY + ["train.steps=3"]), tmp_path / "run", progress=False)
    assert summary["skipped_steps"] == 1
    w = weights(tmp_path / "run", 2)
    assert all(torch.isfinite(v).all() for v in w.values())


def test_bad_batch_split_is_explained():
    with pytest.raises(ValueError, match="global_batch_size"):  # refused when the config is resolved
        train(load_run_config("mnist", TINY + ["train.micro_batch_size=3"]), "/tmp/never-written", progress=False)


def test_multi_budget_draws_from_the_set_after_the_start_step(tmp_path):
    cfg = load_run_config("mnist", TINY + ["train.steps=8", "train.log_every=1", "train.ckpt_every=8",
                                          "train.multi_budget.fractions=[0.25,0.5]", "train.multi_budget.start_step=3"])
    train(cfg, tmp_path / "run", progress=False)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    fractions = [float(r["tail_fraction"]) for r in rows]
    assert fractions[:3] == [0.0, 0.0, 0.0]  # steps 1-3 run before start_step 3 (0-based step index < 3)
    assert set(fractions[3:]) <= {0.25, 0.5} and len(set(fractions[3:])) == 2
    for r, f in zip(rows, fractions):  # effective compression ≥ natural, equal without dropping
        nat, eff = float(r["compression_mean"]), float(r["effective_compression_mean"])
        assert eff >= nat - 1e-6 and (f > 0 or abs(eff - nat) < 1e-6)


def test_init_from_starts_a_fine_tune_from_a_checkpoint(tmp_path):
    train(load_run_config("mnist", TINY + ["train.steps=2"]), tmp_path / "pre", progress=False)
    pre = weights(tmp_path / "pre", 2, "ema")
    cfg = load_run_config("mnist", TINY + ["train.steps=1", "train.lr=1e-12", f"train.init_from={tmp_path / 'pre'}"])
    train(cfg, tmp_path / "ft", progress=False)
    ft = weights(tmp_path / "ft", 1)
    for k in pre:  # started from the EMA weights of the pre-training run (lr ~0: one step moves nothing visible)
        torch.testing.assert_close(ft[k], pre[k], atol=1e-6, rtol=0)
    other = load_run_config("mnist", TINY + ["train.steps=1", "model.hidden_size=64", f"train.init_from={tmp_path / 'pre'}"])
    with pytest.raises(ValueError, match="shape mismatches"):
        train(other, tmp_path / "bad", progress=False)


def test_dydit_fine_tune_logs_the_flops_loss(tmp_path):
    """model.dydit=true + train.init_from: the FLOPs-target loss is added, logged, and trains the routers."""
    train(load_run_config("mnist", TINY + ["train.steps=2"]), tmp_path / "pre", progress=False)
    cfg = load_run_config("mnist", TINY + ["train.steps=3", "model.dydit=true", f"train.init_from={tmp_path / 'pre'}",
                                          "train.dydit_target=0.5", "train.dydit_warmup_steps=0", "train.lr=1e-2"])
    train(cfg, tmp_path / "ft", progress=False)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "ft" / "log.csv")))
    ratios = [float(r["dydit_flops_ratio"]) for r in rows]
    losses = [float(r["dydit_flops_loss"]) for r in rows]
    assert all(0 < r <= 1.0 + 1e-6 for r in ratios)
    from dcdit.models.dydit import flops_target

    for step, (r, loss) in enumerate(zip(ratios, losses)):  # loss = (mean executed/static − target)², per step
        assert loss == pytest.approx((r - flops_target(step, 0, 0.5)) ** 2, rel=1e-4, abs=1e-9)
    pre, ft = weights(tmp_path / "pre", 2, "ema"), weights(tmp_path / "ft", 3)
    assert any(k.endswith("router.weight") or "_router" in k for k in set(ft) - set(pre))  # new router parameters


def test_dydit_router_lr_puts_exactly_the_routers_in_their_own_group():
    from dcdit.config import build_model
    from dcdit.train import parameter_groups

    cfg = load_run_config("mnist", TINY + ["model.dydit=true", "train.lr=1e-4", "train.dydit_router_lr=1e-2"])
    model = build_model(cfg.model)
    groups = parameter_groups(model, cfg.train)
    names = {id(p): n for n, p in model.named_parameters()}
    routers = {names[id(p)] for p in groups[1]["params"]}
    expected = {n for n, _ in model.named_parameters() if "_router." in n}
    assert groups[1]["lr"] == 1e-2 and groups[0]["lr"] == 1e-4 and routers == expected and expected
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    import dataclasses

    plain = load_run_config("mnist", TINY)
    with pytest.raises(ValueError, match="no DyDiT routers"):
        parameter_groups(build_model(plain.model), dataclasses.replace(plain.train, dydit_router_lr=1e-2))
    with pytest.raises(ValueError, match="no DyDiT routers"):  # and already when the config is resolved
        load_run_config("mnist", TINY + ["train.dydit_router_lr=1e-2"])


def test_ema_warmup_follows_the_closed_form(tmp_path):
    """With ema_warmup the EMA after step n is a (1+k)/(10+k)-weighted average; check one tensor by replay."""
    cfg = load_run_config("mnist", TINY + ["train.steps=2", "train.ckpt_every=1", "train.keep_last=5",
                                          "train.ema_warmup=true", "train.ema_decay=0.999"])
    train(cfg, tmp_path / "run", progress=False)
    raw1, raw2 = weights(tmp_path / "run", 1), weights(tmp_path / "run", 2)
    ema1, ema2 = weights(tmp_path / "run", 1, "ema"), weights(tmp_path / "run", 2, "ema")
    for k in ("blocks.0.attn.qkv.weight", "final_layer.linear.weight"):
        # step index 0 uses decay 1/10 on top of the initial weights; step 1 uses 2/11
        torch.testing.assert_close(ema2[k], (2 / 11) * ema1[k] + (9 / 11) * raw2[k], atol=1e-6, rtol=0)
    k = "final_layer.linear.weight"  # zero at init, moved by step 1: the EMA holds 9/10 of it
    torch.testing.assert_close(ema1[k], 0.9 * raw1[k], atol=1e-7, rtol=0)
    assert raw1[k].abs().max() > 0


def test_label_dropout_is_applied_once_from_the_step_stream(tmp_path, monkeypatch):
    """The model sees the null class exactly where the step's stream drew a drop (p = 0.5), not a
    second random drop inside the training-mode model (which made the rate 1 − (1 − p)²)."""
    from dcdit.models.embedders import LabelEmbedder
    from dcdit.train import step_generator

    seen, original = [], LabelEmbedder.token_drop
    monkeypatch.setattr(LabelEmbedder, "token_drop", lambda self, *a: seen.append(original(self, *a)) or seen[-1])
    cfg = load_run_config("mnist", TINY + ["train.steps=4", "model.class_dropout_prob=0.5", "train.ckpt_every=4"])
    train(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 4
    for step, labels in enumerate(seen):
        g = step_generator(cfg.train.seed, step)  # the loop's draw order: t, noise, then the drops
        torch.randint(0, 1000, (8,), generator=g)
        torch.randn(8, 1, 32, 32, generator=g)
        drop = torch.rand(8, generator=g) < 0.5
        assert torch.equal(labels == 10, drop), f"step {step}: labels {labels.tolist()} vs drops {drop.tolist()}"


def test_training_noises_with_the_models_noise_schedule(tmp_path, monkeypatch):
    """model.noise_schedule=cosine: the x_t the model is trained on is √ᾱ x0 + √(1−ᾱ) ε with
    diffusers' squaredcos_cap_v2 ᾱ (not DiT's linear one), and the checkpoint remembers it."""
    diffusers = pytest.importorskip("diffusers")
    from dcdit.checkpoint import load_model
    from dcdit.models.dcdit import DCDiT
    from dcdit.train import build_train_dataset, step_generator

    seen, original = [], DCDiT.forward
    monkeypatch.setattr(DCDiT, "forward", lambda self, x, t, *a, **k: seen.append((x, t)) or original(self, x, t, *a, **k))
    cfg = load_run_config("mnist", TINY + ["train.steps=1", "train.ckpt_every=1", "model.noise_schedule=cosine"])
    train(cfg, tmp_path / "run", progress=False)
    x_t, t = seen[0]
    g = step_generator(cfg.train.seed, 0)
    assert torch.equal(t, torch.randint(0, 1000, (8,), generator=g))
    noise = torch.randn(8, 1, 32, 32, generator=g)
    dataset = build_train_dataset(cfg)
    x0 = torch.stack([dataset[int(i)][0] for i in EpochOrder(len(dataset), cfg.train.seed).indices(0, 8)])
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ac.sqrt() * x0 + (1 - ac).sqrt() * noise, atol=1e-5, rtol=1e-5)
    model, _, _ = load_model(str(tmp_path / "run"))
    assert model.noise_schedule == "cosine"


def test_n_curriculum_reaches_the_ratio_loss(tmp_path, monkeypatch):
    """train.target_ratio_start / target_ratio_warmup_steps: the ratio loss of step k sees N(k)."""
    import dcdit.train as train_module

    seen = []
    real = train_module.ratio_loss
    monkeypatch.setattr(train_module, "ratio_loss", lambda record, n, group: seen.append(n) or real(record, n, group))
    cfg = load_run_config("mnist", TINY + ["train.steps=5", "train.target_ratio_start=2.0", "train.target_ratio_warmup_steps=4",
                                           "model.target_ratio=4.0"])
    train(cfg, tmp_path / "run", progress=False)
    assert seen == [2.0, 2.5, 3.0, 3.5, 4.0]


# ------------------------------------------------------------------ the loop's parts, each alone


def test_optimizer_update_applies_finite_steps_and_skips_the_rest():
    """Finite gradients: AdamW moves the weights and the EMA is decay·ema + (1 − decay)·new weights.
    A NaN gradient (or a loss flagged non-finite): nothing moves, the Adam state stays empty."""
    from dcdit.train import optimizer_update, setup_run

    cfg = load_run_config("mnist", TINY + ["train.ema_decay=0.9", "train.ema_warmup=false", "train.grad_clip=0"])
    run = setup_run(cfg, "/tmp/never-written", resume=False, device="cpu")
    p = run.model.final_layer.linear.weight
    before, ema_before = p.detach().clone(), run.ema.final_layer.linear.weight.detach().clone()
    for q in run.model.parameters():
        q.grad = torch.ones_like(q)
    q0 = next(run.model.parameters())
    q0.grad[0] = float("nan")
    assert optimizer_update(run, torch.ones(()))[0] is False
    assert torch.equal(p, before) and not run.optimizer.state and all(q.grad is None for q in run.model.parameters())
    for q in run.model.parameters():
        q.grad = torch.ones_like(q)
    assert optimizer_update(run, torch.zeros(()))[0] is False  # the loss was not finite on some micro-batch
    for q in run.model.parameters():
        q.grad = torch.ones_like(q)
    applied, norm = optimizer_update(run, torch.ones(()))
    n = sum(q.numel() for q in run.model.parameters() if q.requires_grad)
    assert applied and norm == pytest.approx(n ** 0.5, rel=1e-5)
    torch.testing.assert_close(p.detach(), before - 1e-3, atol=1e-6, rtol=0)  # Adam's first step: lr · sign(grad)
    torch.testing.assert_close(run.ema.final_layer.linear.weight, 0.9 * ema_before + 0.1 * p.detach())


def test_loss_terms_add_the_weighted_ratio_loss():
    """Same batch and seeds, ratio_loss_weight 0 vs 0.5: the totals differ by 0.5 × the ratio loss of
    the step's routing record (recomputed here with dcdit.ratio_loss)."""
    from dcdit.ratio_loss import ratio_loss
    from dcdit.train import draw_step, load_micro_batch, loss_terms, setup_run

    totals = {}
    for w in (0.0, 0.5):
        run = setup_run(load_run_config("mnist", TINY + [f"train.ratio_loss_weight={w}"]), "/tmp/never-written",
                        resume=False, device="cpu")
        batch = load_micro_batch(run, draw_step(run), 0)
        torch.manual_seed(0)
        terms = loss_terms(run, batch, 0.0)
        totals[w] = terms
    r = ratio_loss(totals[0.5]["record"], 4.0, 4)
    assert float(r.detach()) > 0 and torch.equal(totals[0.0]["diffusion"], totals[0.5]["diffusion"])
    torch.testing.assert_close(totals[0.5]["loss"] - totals[0.0]["loss"], 0.5 * r)
    torch.testing.assert_close(totals[0.0]["loss"], totals[0.0]["diffusion"])


# ------------------------------------------------------------------ guards (issue 18): divergence, signals, resume, labels


def all_checkpoint_tensors(run_dir: Path) -> dict:
    out = {}
    for ckpt in sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()):
        for which in ("model", "ema"):
            out.update({f"{ckpt.name}/{which}/{k}": v for k, v in weights(run_dir, int(ckpt.name), which).items()})
    return out


def test_divergence_stops_after_max_nonfinite_steps(tmp_path, capsys):
    """lr = 1e30: step 1 is finite (the loss is taken before the update), every later step is not.
    With max_nonfinite_steps=3 the run stops at step 4 with one line naming the key, and every
    checkpoint on disk holds finite weights."""
    from dcdit.cli import main

    run = tmp_path / "run"
    code = main(["train", "mnist", *TINY, "train.lr=1e30", "train.max_nonfinite_steps=3", "train.steps=50",
                 "train.ckpt_every=1", "train.keep_last=10", "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "training diverged: steps 2-4" in err[0] and "train.max_nonfinite_steps=3" in err[0] and "train.lr" in err[0]
    tensors = all_checkpoint_tensors(run)
    assert {k.split("/")[0] for k in tensors} == {"0000001", "0000002", "0000003"}  # nothing after the stop
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_only_consecutive_nonfinite_steps_count(tmp_path, monkeypatch):
    """NaN losses at steps 2 and 4 with max_nonfinite_steps=2: the streak restarts, the run finishes.
    At steps 2 and 3 it stops (a counter of all skipped steps would stop in both cases)."""
    import dcdit.train as T

    real = T.ratio_loss

    def nan_at(steps):
        calls = {"n": 0}

        def ratio(record, *a, **k):
            calls["n"] += 1  # one micro-batch per step here
            out = real(record, *a, **k)
            return out * float("nan") if calls["n"] in steps else out
        return ratio

    monkeypatch.setattr(T, "ratio_loss", nan_at({2, 4}))
    summary = train(load_run_config("mnist", TINY + ["train.steps=5", "train.max_nonfinite_steps=2"]), tmp_path / "a",
                    progress=False)
    assert summary["step"] == 5 and summary["skipped_steps"] == 2
    monkeypatch.setattr(T, "ratio_loss", nan_at({2, 3}))
    with pytest.raises(T.TrainingDiverged, match="steps 2-3"):
        train(load_run_config("mnist", TINY + ["train.steps=5", "train.max_nonfinite_steps=2"]), tmp_path / "b",
              progress=False)


def test_nonfinite_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """A finite loss and gradient can still leave NaN weights (train.lr=inf does): the checkpoint of
    that step is refused, the one before stays the newest, and no temporary folder is left."""
    import dcdit.train as T

    real = T.optimizer_update

    def poison_step_two(run, loss_ok):
        out = real(run, loss_ok)
        if run.step == 1:  # the update of step 2
            with torch.no_grad():
                run.model.final_layer.linear.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(T, "optimizer_update", poison_step_two)
    cfg = load_run_config("mnist", TINY + ["train.steps=4", "train.ckpt_every=1"])
    with pytest.raises(T.TrainingDiverged, match=r"step 2: the weights hold non-finite values \(final_layer.linear.weight"):
        train(cfg, tmp_path / "run", progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000001", "latest"]
    assert all(torch.isfinite(v).all() for v in all_checkpoint_tensors(tmp_path / "run").values())


def wait_for_log_row(run_dir: Path, proc, min_step: int = 2, timeout: float = 300) -> None:
    import time

    log, t0 = run_dir / "log.csv", time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was signalled:\n{proc.stderr.read()[-3000:]}")
        if log.exists() and any(r.split(",")[0].isdigit() and int(r.split(",")[0]) >= min_step
                                for r in log.read_text().splitlines()[1:]):
            return
        time.sleep(0.1)
    raise AssertionError("no log row in time")


def test_sigterm_checkpoints_and_the_resumed_run_is_exact(tmp_path):
    """A real `dcdit train` receives SIGTERM mid-run: it finishes the step, writes a checkpoint at
    that step (no ckpt_every step is near), exits 143 with the resume command; resumed to two steps
    further it equals, bit for bit, a run that was never interrupted."""
    import signal

    args = ["train", "mnist", *TINY, "train.log_every=1", "train.ckpt_every=100000", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dcdit.cli", *args, "train.steps=100000", "--out", str(tmp_path / "a")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_row(tmp_path / "a", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    k = int((tmp_path / "a" / "checkpoints" / "latest").read_text())
    assert k >= 2 and f"stopped by SIGTERM after step {k}" in err and f"--out {tmp_path / 'a'} --resume" in err
    run_cli([*args, f"train.steps={k + 2}", "--out", str(tmp_path / "a"), "--resume"])
    run_cli([*args, f"train.steps={k + 2}", "--out", str(tmp_path / "b")])
    for which in ("model", "ema"):
        a, b = weights(tmp_path / "a", k + 2, which), weights(tmp_path / "b", k + 2, which)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), which


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun with 2 gloo ranks; SIGTERM goes to rank 1 only. Rank 0 never sees it, yet writes the
    checkpoint of the step at which both stop (reduced stop flag), and both processes exit."""
    import signal

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dcdit.cli", "train",
           "mnist", *TINY, "train.log_every=1", "train.ckpt_every=100000", "train.steps=100000", "--out", str(tmp_path / "r"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_row(tmp_path / "r", proc)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        rank1 = [int(c) for c in children if b"RANK=1" in Path(f"/proc/{c}/environ").read_bytes().split(b"\0")]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0
    k = int((tmp_path / "r" / "checkpoints" / "latest").read_text())
    assert 2 <= k < 100000 and f"stopped by SIGTERM after step {k}" in err
    rows = [r.split(",")[0] for r in (tmp_path / "r" / "log.csv").read_text().splitlines()[1:]]
    assert rows[-1] == str(k)  # rank 0 stopped after that step, too


def test_resume_with_changed_settings_is_refused_unless_allowed(tmp_path, capsys):
    from dcdit.cli import main

    run = tmp_path / "run"
    base = ["train", "mnist", *TINY, "--out", str(run), "--no-progress"]
    assert main([*base, "train.steps=2"]) == 0
    capsys.readouterr()
    assert main([*base, "train.steps=4", "train.seed=1", "train.micro_batch_size=4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.seed: 0 in the run, 1 now" in err and "train.micro_batch_size: None in the run, 4 now" in err
    assert "batch layout: 1 process(es) × micro-batch 8 in the run, 1 × 4 now" in err and "--allow-changed" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000002"  # nothing trained
    assert main([*base, "train.steps=3", "train.log_every=5", "train.ckpt_every=7", "--resume"]) == 0  # free settings
    capsys.readouterr()
    assert main([*base, "train.steps=4", "train.lr=5e-4", "--resume", "--allow-changed"]) == 0
    out = capsys.readouterr().out
    assert "changed settings" in out and "train.lr: 0.001 in the run, 0.0005 now" in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000004"


@pytest.mark.parametrize("num_classes", [5, 9])
def test_num_classes_below_the_datas_labels_is_refused_before_training(tmp_path, num_classes):
    """MNIST labels are 0..9: num_classes=9 would make digit 9 the null class, 5 would index past the table."""
    cfg = load_run_config("mnist", TINY + [f"model.num_classes={num_classes}"])
    with pytest.raises(ValueError, match=rf"labels 0\.\.9 but model.num_classes={num_classes}.*set model.num_classes=10"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_stop_signals_set_a_flag_and_a_second_signal_acts_at_once():
    import signal
    import threading

    from dcdit.preemption import StopSignals

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.agreed("cpu") == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
