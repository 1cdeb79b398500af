"""Tests of dcdit.sampling: generation (DiT and DC-DiT, DDPM and DDIM, CFG and Lite-CFG), the trace
and snapshots, and the ADM-suite image / npz conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.sampling import SampleResult, generate, save_settings_json, to_uint8_images, write_npz

STEPS = 10


@pytest.fixture
def dcdit_model(helpers):
    """Tiny DC-DiT with every path live (several boundaries per sample), eval mode."""
    return helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT)).eval()


@pytest.fixture
def dit_model(helpers):
    return helpers.randomize_(helpers.make_model(helpers.TINY_DIT)).eval()


def _alphas_cumprod() -> np.ndarray:
    """DiT's linear schedule, computed here independently of dcdit.diffusion."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------ to_uint8_images / write_npz


def test_to_uint8_images_hand_computed():
    # (x + 1)·127.5 rounded half up, clamped: -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128,
    # -2 -> clamp 0, 3 -> clamp 255, x with (x+1)·127.5 = 10.3 -> 10, = 10.7 -> 11.
    vals = [-1.0, 1.0, 0.0, -2.0, 3.0, 10.3 / 127.5 - 1, 10.7 / 127.5 - 1, 0.5]
    expected = [0, 255, 128, 0, 255, 10, 11, 191]  # 0.5 -> 191.25 -> 191
    x = torch.tensor(vals).reshape(1, 1, 2, 4)
    out = to_uint8_images(x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 4, 3)
    for c in range(3):  # 1 channel replicated
        assert out[0, :, :, c].reshape(-1).tolist() == expected


def test_to_uint8_images_rgb_channel_order():
    x = torch.full((2, 3, 2, 2), -1.0)
    x[:, 1] = 1.0  # green channel
    x[1, 2] = 0.0
    out = to_uint8_images(x)
    assert out.shape == (2, 2, 2, 3)
    assert (out[0] == np.array([0, 255, 0], np.uint8)).all()
    assert (out[1] == np.array([0, 255, 128], np.uint8)).all()


def test_to_uint8_images_rejects_nonfinite_and_bad_channels():
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 1, 1] = float("inf")
    x[1, 0, 2, 2] = float("-inf")
    with pytest.raises(ValueError, match="3 NaN/inf"):
        to_uint8_images(x)
    with pytest.raises(ValueError, match="channels"):
        to_uint8_images(torch.zeros(1, 4, 4, 4))


def test_write_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    path = write_npz(imgs, tmp_path / "sub" / "samples.npz")
    with np.load(path) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(arr, imgs)
    with pytest.raises(ValueError):
        write_npz(imgs.astype(np.float32), tmp_path / "bad.npz")
    with pytest.raises(ValueError):
        write_npz(imgs[..., :1], tmp_path / "bad.npz")


def test_save_settings_json(tmp_path):
    path = save_settings_json(tmp_path / "a" / "settings.json", {"cfg_scale": 1.5, "seed": torch.tensor(3), "x": None})
    data = json.loads(open(path).read())
    assert data["cfg_scale"] == 1.5 and data["seed"] == 3 and data["x"] is None
    for key in ("dcdit_version", "torch_version", "device", "date"):
        assert key in data
    assert data["torch_version"] == torch.__version__


# ------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_generate_shapes_and_determinism(arch, sampler, dcdit_model, dit_model):
    model = dcdit_model if arch == "dcdit" else dit_model
    labels = torch.tensor([0, 3, 9])
    r1 = generate(model, labels, sampler=sampler, num_sampling_steps=STEPS, seed=7)
    r2 = generate(model, labels, sampler=sampler, num_sampling_steps=STEPS, seed=7)
    r3 = generate(model, labels, sampler=sampler, num_sampling_steps=STEPS, seed=8)
    assert isinstance(r1, SampleResult)
    assert r1.samples.shape == (3, 1, 8, 8)
    assert torch.isfinite(r1.samples).all()
    assert torch.equal(r1.samples, r2.samples)
    assert not torch.allclose(r1.samples, r3.samples)
    assert len(r1.trace) == STEPS
    for e in r1.trace:
        assert e["tokens"] == 64
        assert e["kept"].shape == (3,) and e["natural"].shape == (3,)
        assert "uncond_kept" not in e  # cfg_scale = 1: no CFG batch
    if arch == "dit":
        assert r1.snapshots == []
        assert all(e["kept"].tolist() == [16] * 3 for e in r1.trace)  # (8/2)² patches
    else:
        assert 1 <= len(r1.snapshots) <= 8


def test_generate_does_not_depend_on_global_rng(dcdit_model):
    torch.manual_seed(123)
    a = generate(dcdit_model, [1, 2], num_sampling_steps=5, seed=0).samples
    torch.manual_seed(456)
    b = generate(dcdit_model, [1, 2], num_sampling_steps=5, seed=0).samples
    assert torch.equal(a, b)


def _expected_timesteps(sampler: str, K: int, T: int = 1000) -> list[int]:
    """Kept original timesteps, in sampling order, by the improved-DDPM respacing rules
    (written out here independently of dcdit.diffusion.space_timesteps)."""
    if sampler == "ddim":  # smallest integer stride giving exactly K steps of range(0, T, stride)
        stride = next(s for s in range(1, T) if len(range(0, T, s)) == K)
        kept = list(range(0, T, stride))
    else:  # one section [0, T): K evenly spaced points including both ends
        kept = sorted({int(np.floor(k * (T - 1) / (K - 1) + 0.5)) for k in range(K)})
    return kept[::-1]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_trace_timesteps_follow_respacing(sampler, dcdit_model):
    seen = []
    orig_forward = dcdit_model.forward

    def spy(x, t, y, *a, **k):
        seen.append(t.tolist())
        return orig_forward(x, t, y, *a, **k)

    dcdit_model.forward = spy
    try:
        r = generate(dcdit_model, [4], sampler=sampler, num_sampling_steps=STEPS, num_snapshots=3)
    finally:
        del dcdit_model.forward
    ts = [e["t"] for e in r.trace]
    expected = _expected_timesteps(sampler, STEPS)
    # ddpm 10: 999, 888, ..., 0; ddim10: 900, 800, ..., 0
    assert expected == ([999 - 111 * k for k in range(10)] if sampler == "ddpm" else [900 - 100 * k for k in range(10)])
    assert ts == expected
    assert [s[0] for s in seen] == expected  # the model saw the original timesteps
    assert [e["step"] for e in r.trace] == list(range(STEPS))
    # snapshots: first, middle, last step
    assert [s["t"] for s in r.snapshots] == [expected[0], expected[round(4.5)], expected[-1]]


def test_trace_250_steps_endpoints(dit_model):
    r = generate(dit_model, [1], num_sampling_steps=250, num_snapshots=0)
    ts = [e["t"] for e in r.trace]
    assert len(ts) == 250 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    # the improved-DDPM set: accumulated fractional stride 999/249, rounded half to even
    pos, kept = 0.0, []
    for _ in range(250):
        kept.append(round(pos))
        pos += 999 / 249
    assert ts == sorted(kept, reverse=True)


def test_snapshots_shapes(dcdit_model):
    r = generate(dcdit_model, [1, 2, 3], num_sampling_steps=STEPS, num_snapshots=4)
    assert len(r.snapshots) == 4
    for s in r.snapshots:
        assert s["x_t"].shape == (3, 1, 8, 8) and s["x_t"].device.type == "cpu"
        assert s["p"].shape == (3, 8, 8) and s["p"].dtype == torch.float32
        assert s["kept_mask"].shape == (3, 8, 8) and s["kept_mask"].dtype == torch.bool
        assert float(s["p"].min()) >= 0 and float(s["p"].max()) <= 1
        # the mask in the snapshot agrees with the trace counts at that step
        e = r.trace[s["step"]]
        assert e["t"] == s["t"]
        assert s["kept_mask"].sum((1, 2)).tolist() == e["kept"].tolist()
    # the first snapshot's x_t is the seeded initial noise
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.snapshots[0]["x_t"], z)


def test_lite_cfg_tail_dropping(dcdit_model):
    records = []
    orig_forward = dcdit_model.forward

    def spy(*a, **k):
        out = orig_forward(*a, **k)
        records.append((a, k, out[1]))
        return out

    dcdit_model.forward = spy
    try:
        r = generate(
            dcdit_model, [1, 5, 7], num_sampling_steps=STEPS, cfg_scale=2.0,
            tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.9,
        )
    finally:
        del dcdit_model.forward
    assert len(records) == STEPS and len(r.trace) == STEPS
    saw_drop = False
    for (args, kwargs, rec), e in zip(records, r.trace):
        y = args[2]
        assert y.tolist() == [1, 5, 7, 10, 10, 10]  # null label = num_classes, not 1000
        natural = rec.natural_mask.sum(1)
        kept = rec.kept_mask.sum(1)
        n_c, n_u = natural[:3], natural[3:]
        # conditional half untouched (f = 0): everything natural is kept
        assert torch.equal(kept[:3], n_c)
        assert torch.equal(rec.kept_mask[:3], rec.natural_mask[:3])
        # unconditional half: n - floor(0.9 n), computed by hand
        expected_u = [n - int(np.floor(0.9 * n + 1e-9)) for n in n_u.tolist()]
        assert kept[3:].tolist() == expected_u
        saw_drop |= any(k < n for k, n in zip(expected_u, n_u.tolist()))
        # the trace reports the halves
        assert e["kept"].tolist() == kept[:3].tolist() and e["natural"].tolist() == n_c.tolist()
        assert e["uncond_kept"].tolist() == expected_u and e["uncond_natural"].tolist() == n_u.tolist()
    assert saw_drop, "the test model never had enough boundaries for 0.9 tail-dropping to bite"
    assert r.samples.shape == (3, 1, 8, 8)
    assert r.lite_cfg


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
def test_cfg_near_one_matches_conditional_sampling(arch, dcdit_model, dit_model):
    """With s = 1 + 1e-6 the guided ε is the conditional ε: the CFG path (cond half of a 2B batch,
    uncond half with a different tail fraction for DC-DiT) must reproduce the plain conditional run."""
    model = dcdit_model if arch == "dcdit" else dit_model
    kw = dict(num_sampling_steps=STEPS, seed=3)
    plain = generate(model, [2, 8], **kw)
    extra = dict(uncond_tail_dropping_fraction=0.5) if arch == "dcdit" else {}
    cfg = generate(model, [2, 8], cfg_scale=1.0 + 1e-6, **extra, **kw)
    assert "uncond_kept" in cfg.trace[0]
    torch.testing.assert_close(cfg.samples, plain.samples, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a["kept"], b["kept"]) for a, b in zip(cfg.trace, plain.trace))
    # and a real guidance scale changes the result
    strong = generate(model, [2, 8], cfg_scale=4.0, **kw)
    assert not torch.allclose(strong.samples, plain.samples, atol=1e-3)


def test_guidance_channels_reach_the_guided_call(helpers, monkeypatch):
    """generate(guidance_channels=k) reaches the guidance of every step, and it matters: on a
    2-channel DiT guiding channel 0 only gives other samples than guiding both."""
    import dcdit.sampling as S

    dit = helpers.randomize_(helpers.make_model(helpers.TINY_DIT, in_channels=2)).eval()
    seen, real = [], S.predict_guided
    monkeypatch.setattr(S, "predict_guided", lambda *a, **k: seen.append(k["guidance_channels"]) or real(*a, **k))
    one = generate(dit, [1], num_sampling_steps=2, cfg_scale=3.0, guidance_channels=1).samples
    assert seen == [1, 1]
    both = generate(dit, [1], num_sampling_steps=2, cfg_scale=3.0).samples
    assert not torch.allclose(one, both)


# --------------------------------------------------- the loop's parts, each alone


def test_model_function_is_the_model_call_in_fp32(dcdit_model, dit_model, helpers):
    """Unguided: predict(model, x, t, labels); guided: predict_guided with [labels; null]."""
    from dcdit.models.guidance import cfg_labels
    from dcdit.models.interface import predict, predict_guided
    from dcdit.sampling import model_function

    x, t, y = helpers.tiny_inputs(3)
    with torch.no_grad():
        for model in (dcdit_model, dit_model):
            out, rec = model_function(model, y)(x, t)
            ref, ref_rec = predict(model, x, t, y)
            assert out.dtype == torch.float32 and torch.equal(out, ref) and (rec is None) == (ref_rec is None)
        fn = model_function(dcdit_model, y, cfg_scale=2.0, uncond_tail_dropping_fraction=0.5)
        x2, t2 = torch.cat([x, x]), torch.cat([t, t])
        out, rec = fn(x2, t2)
        ref, ref_rec = predict_guided(dcdit_model, x2, t2, cfg_labels(y, 10), 2.0, uncond_tail_dropping_fraction=0.5)
    assert torch.equal(out, ref) and torch.equal(rec.kept_mask, ref_rec.kept_mask)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sampler_step_is_one_step_of_the_chosen_sampler(sampler, eta):
    """sampler_step = the diffusion's p_sample / ddim_sample with the same noise, clip and eta
    (each sampler is checked against diffusers in tests/diffusion); DDIM with eta 1 differs from eta 0."""
    from dcdit.diffusion import create_diffusion
    from dcdit.sampling import sampler_step

    diffusion = create_diffusion("ddim10" if sampler == "ddim" else "10", learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    t = torch.full((2,), 5)

    def model_fn(x, t):
        return 3 * x, None  # an ε far from the truth: clipping x̂0 to [-1, 1] bites

    out = sampler_step(diffusion, sampler, clip_denoised=True, eta=eta)(model_fn, x, t, noise)
    if sampler == "ddpm":
        ref = diffusion.p_sample(model_fn, x, t, noise=noise, clip_denoised=True)
    else:
        ref = diffusion.ddim_sample(model_fn, x, t, noise=noise, clip_denoised=True, eta=eta)
        other = diffusion.ddim_sample(model_fn, x, t, noise=noise, clip_denoised=True, eta=1.0 - eta)
        assert not torch.allclose(out["sample"], other["sample"])
    assert torch.equal(out["sample"], ref["sample"]) and float(out["pred_xstart"].abs().max()) <= 1.0


def _record(kept_rows, natural_rows, grid=(2, 2)):
    """A RoutingRecord from boolean rows (B, L) written by hand; p = 0.9 on natural boundaries, else 0.1."""
    from dcdit.models.chunking import RoutingRecord

    kept, natural = torch.tensor(kept_rows), torch.tensor(natural_rows)
    M = int(kept.sum(1).max())
    idx = torch.tensor([torch.nonzero(r).flatten().tolist() + [0] * (M - int(r.sum())) for r in kept])
    return RoutingRecord(torch.where(natural, 0.9, 0.1), natural, kept, idx, kept.sum(1), grid)


def test_trace_entry_counts_each_half():
    """Hand-made [cond; uncond] record: cond keeps 3 and 1 of 4 tokens (naturally 3 and 2), uncond 1 and 2."""
    from dcdit.sampling import trace_entry

    T, F = True, False
    rec = _record([[T, T, T, F], [T, F, F, F], [T, F, F, F], [F, T, T, F]],
                  [[T, T, T, F], [T, T, F, F], [T, T, F, F], [F, T, T, F]])
    e = trace_entry(4, 600, rec, batch=2, tokens=4, guided=True, fixed_tokens=None)
    assert (e["t"], e["step"], e["tokens"]) == (600, 4, 4)
    assert e["kept"].tolist() == [3, 1] and e["natural"].tolist() == [3, 2]
    assert e["uncond_kept"].tolist() == [1, 2] and e["uncond_natural"].tolist() == [2, 2]
    unguided = trace_entry(0, 999, rec, batch=4, tokens=4, guided=False, fixed_tokens=None)
    assert unguided["kept"].tolist() == [3, 1, 1, 2] and "uncond_kept" not in unguided
    dit = trace_entry(0, 999, None, batch=2, tokens=64, guided=True, fixed_tokens=16)  # fixed patches
    assert dit["kept"].tolist() == dit["uncond_natural"].tolist() == [16, 16]


def test_snapshot_maps_are_the_conditional_halfs_on_the_grid():
    from dcdit.sampling import snapshot

    T, F = True, False
    rec = _record([[T, F, F, T], [F, T, F, F]], [[T, F, T, T], [F, T, F, F]])
    x = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).view(2, 1, 2, 2)
    snap = snapshot(3, 700, x, -x, rec, guided=True)
    assert snap["x_t"].shape == (1, 1, 2, 2) and torch.equal(snap["x_t"], x[:1]) and torch.equal(snap["pred_xstart"], -x[:1])
    assert snap["kept_mask"].tolist() == [[[T, F], [F, T]]] and snap["natural_mask"].tolist() == [[[T, F], [T, T]]]
    assert snap["uncond_kept_mask"].tolist() == [[[F, T], [F, F]]]
    torch.testing.assert_close(snap["p"], torch.tensor([[[0.9, 0.1], [0.9, 0.9]]]))


def test_fixed_token_count(dit_model):
    """A DiT/2 on an 8×8 grid processes 16 patches; a model without patches processes every position."""
    from dcdit.sampling import fixed_token_count

    assert fixed_token_count(dit_model) == 16
    assert fixed_token_count(PointMassEps(torch.zeros(1, 4, 6))) == 24


def test_invalid_inputs_raise(dcdit_model, dit_model):
    with pytest.raises(ValueError, match="labels"):
        generate(dcdit_model, [0, 10], num_sampling_steps=2)  # 10 = null label, not a class
    with pytest.raises(ValueError, match="labels"):
        generate(dcdit_model, [-1], num_sampling_steps=2)
    with pytest.raises(ValueError, match="labels"):
        generate(dcdit_model, [[1, 2]], num_sampling_steps=2)
    with pytest.raises(ValueError, match="labels"):
        generate(dcdit_model, torch.tensor([1.0]), num_sampling_steps=2)
    with pytest.raises(ValueError, match="sampler"):
        generate(dcdit_model, [1], sampler="euler", num_sampling_steps=2)
    with pytest.raises(ValueError, match="tail"):
        generate(dit_model, [1], num_sampling_steps=2, tail_dropping_fraction=0.5)
    with pytest.raises(ValueError, match="tail_dropping_fraction"):
        generate(dcdit_model, [1], num_sampling_steps=2, tail_dropping_fraction=1.0)


def test_model_mode_restored(dcdit_model):
    dcdit_model.train()
    try:
        seen = []
        orig = dcdit_model.forward

        def spy(*a, **k):
            seen.append(dcdit_model.training)
            return orig(*a, **k)

        dcdit_model.forward = spy
        generate(dcdit_model, [1], num_sampling_steps=2)
        del dcdit_model.forward
        assert seen == [False, False]  # sampled in eval mode (no label dropout)
        assert dcdit_model.training
    finally:
        dcdit_model.eval()


# -------------------------------------------------- exact-ε model for a point-mass data distribution


class PointMassEps(nn.Module):
    """Predicts the exact ε for data = a single point x0: ε = (x_t − √ᾱ_t x0) / √(1 − ᾱ_t)."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: np.ndarray | None = None):
        super().__init__()
        self.register_buffer("x0", x0)
        self.register_buffer("ac", torch.tensor(_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod))
        self.num_classes, self.learn_sigma, self.in_channels = 10, False, x0.shape[0]
        self.grid = tuple(x0.shape[1:])
        self.class_dropout_prob = 0.1
        self.dummy = nn.Parameter(torch.zeros(()))
        self.ts = []

    def forward(self, x, t, y):
        self.ts.append(t[0].item())
        a = self.ac[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * self.x0.double()) / (1 - a).sqrt()).float()

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None):
        return self.forward(x, t, y)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_exact_eps_recovers_point_mass(sampler):
    x0 = torch.linspace(-0.8, 0.9, 2 * 4 * 4).reshape(2, 4, 4)
    model = PointMassEps(x0)
    r = generate(model, [0, 1, 2], sampler=sampler, num_sampling_steps=20, seed=5, num_snapshots=0)
    # DDIM (η = 0) and DDPM both land on x0 at t = 0 whatever the noise (posterior at t=0 is x̂0)
    torch.testing.assert_close(r.samples, x0.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    assert model.ts == _expected_timesteps(sampler, 20)
    assert r.trace[0]["kept"].tolist() == [16, 16, 16]  # no routing record: all positions


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_uses_the_models_noise_schedule(sampler):
    """A model trained with the cosine schedule (its ε is exact under diffusers' squaredcos_cap_v2
    ᾱ) is sampled with that schedule: the point mass is recovered. Sampled with the linear one
    (what the model would get if the setting were ignored) it is not."""
    diffusers = pytest.importorskip("diffusers")
    ac = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod
    x0 = torch.linspace(-0.8, 0.9, 2 * 4 * 4).reshape(2, 4, 4)
    model = PointMassEps(x0, ac.double().numpy())
    model.noise_schedule = "cosine"
    r = generate(model, [0, 1, 2], sampler=sampler, num_sampling_steps=20, seed=5, num_snapshots=0)
    torch.testing.assert_close(r.samples, x0.expand(3, -1, -1, -1), atol=1e-3, rtol=0)
    model.noise_schedule = "linear"
    wrong = generate(model, [0, 1, 2], sampler=sampler, num_sampling_steps=20, seed=5, num_snapshots=0)
    assert (wrong.samples - x0).abs().max() > 10 * (r.samples - x0).abs().max()
