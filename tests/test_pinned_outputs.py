"""Pinned outputs: sampling and the demo give bit-identical results across refactors.

The reference file ``tests/fixtures/pinned_outputs.pt`` is written by this module's ``main``, one
thread, CPU, and records the machine it was written on (CPU vendor, torch's CPU kernel level, torch
version: what decides which kernels run). On such a machine the pins are exact; on another the same
arithmetic runs on other kernels, so the pins hold within the tolerances of
:func:`assert_near_pins` (measured on an AMD EPYC / AVX2 against pins written on an Intel Xeon:
ddim cases ≤ 4.2e-5, ddpm + CFG 4 one kept count flipped by 3 and three by 1 in 80, its flipped
images ≤ 0.10, the others ≤ 4.5e-4; the tiny DiT 6.8e-5 relative). A change that *means* to change
numerics (a new kernel, a new default) regenerates it with ``python tests/test_pinned_outputs.py``
and says why in its commit message; a refactor never does. History: first written on the code of
2026-11-30 on an Intel Xeon; rewritten 2026-12-01 on an AMD EPYC (AVX2) from unchanged code, after
checking that it met the cross-machine tolerances against the Intel pins.

Which wrong change each case catches: a sampler loop that reorders noise draws or guidance (DDPM and
DDIM with CFG), a lost tail-drop or Lite-CFG argument (the kept-token traces), a DiT call path that
changed (the DiT case), and the demo command's image pipeline (the PNG bytes).

The pins are exact for DC-DiT's padded execution (``model.execution=padded``, the reference path the
pins were written with). Packed execution (the default since issue 17) runs the same arithmetic on
differently shaped kernels, so it is compared with a stated tolerance instead (see
``test_packed_demo_sampling_matches_the_pins``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dcdit.checkpoint import load_model
from dcdit.cli import DEMO_CHECKPOINT, main as cli_main
from dcdit.config import build_model
from dcdit.sampling import generate
from dcdit.utils import cpu_info

REFERENCE = Path(__file__).parent / "fixtures" / "pinned_outputs.pt"


def machine_signature() -> dict:
    """What decides which CPU kernels run: the CPU vendor, torch's kernel level, the torch version."""
    return {"vendor": cpu_info()["vendor"], "capability": torch.backends.cpu.get_cpu_capability(), "torch": str(torch.__version__)}

TINY_DIT = dict(arch="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)

# name -> generate() keyword arguments for the shipped demo DC-DiT
DEMO_CASES = {
    "demo_ddpm_cfg4": dict(sampler="ddpm", num_sampling_steps=4, cfg_scale=4.0, clip_denoised=True),
    "demo_ddim_tail03": dict(sampler="ddim", num_sampling_steps=4, cfg_scale=1.0, tail_dropping_fraction=0.3,
                             clip_denoised=True),
    "demo_ddim_lite_eta1": dict(sampler="ddim", num_sampling_steps=3, cfg_scale=2.0, tail_dropping_fraction=0.0,
                                uncond_tail_dropping_fraction=0.9, eta=1.0, clip_denoised=True),
}


def _tiny_dit():
    torch.manual_seed(0)
    model = build_model(TINY_DIT)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a freshly initialised DiT outputs 0: give every weight a value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _demo_model(execution: str = "padded"):
    model = load_model(DEMO_CHECKPOINT)[0]
    model.execution = execution  # a code path, no weights: switchable after loading
    return model


def _with_execution(loaded, execution: str):
    loaded[0].execution = execution
    return loaded


def _run_case(model, kwargs) -> dict:
    res = generate(model, list(range(10)), seed=7, num_snapshots=0, **kwargs)
    out = {"samples": res.samples.clone()}
    if "kept" in res.trace[0]:
        out["kept"] = torch.stack([e["kept"] for e in res.trace])
    if "uncond_kept" in res.trace[0]:
        out["uncond_kept"] = torch.stack([e["uncond_kept"] for e in res.trace])
    return out


def _demo_png_sha256(tmp: Path, execution: str = "padded") -> str:
    """Run ``dcdit demo`` with the demo model in the given execution (dcdit.pipelines loads it with load_model)."""
    import dcdit.pipelines

    load = dcdit.pipelines.load_model
    dcdit.pipelines.load_model = lambda *a, **k: _with_execution(load(*a, **k), execution)
    try:
        assert cli_main(["demo", "--out", str(tmp), "--sampling-steps", "3", "--per-class", "1", "--no-progress"]) == 0
    finally:
        dcdit.pipelines.load_model = load
    return hashlib.sha256((tmp / "samples.png").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="module")
def pin_machine(reference) -> bool:
    """Whether this machine runs the kernels the pins were written with (then they are exact)."""
    return reference["machine"] == machine_signature()


def assert_near_pins(got: dict, want: dict, case: str) -> None:
    """Same arithmetic on other kernels (packed execution, another CPU): rounding-level differences
    can flip a router decision whose p sits at the 0.5 threshold, and CFG 4 amplifies it. Bounds:
    ≤ 10% of a trace's entries may flip, by ≤ 3 tokens; images whose kept counts did not change
    within 1e-2 (max) and 1e-4 (mean) — a decision can also swap two tokens and keep the count
    (packed against AMD pins, demo_ddpm_cfg4 image 0: max 1.2e-3, mean 2.3e-5) —, images with a
    changed count within a mean of 5e-3. A reordered noise draw, a lost tail-drop or Lite-CFG
    argument moves every image by O(0.1–1) and most kept counts."""
    flipped = torch.zeros(got["samples"].shape[0], dtype=torch.bool)
    for key in ("kept", "uncond_kept"):
        if key in want:
            delta = (got[key] - want[key]).abs()
            assert float((delta > 0).float().mean()) <= 0.1 and int(delta.max()) <= 3, f"{case}/{key}: {delta.tolist()}"
            flipped |= (delta > 0).any(0)
    err = (got["samples"] - want["samples"]).abs().flatten(1)  # (images, pixels)
    assert float(err[~flipped].max()) <= 1e-2 and float(err[~flipped].mean(1).max()) <= 1e-4, (
        f"{case}: images without a kept-count change differ by {err[~flipped].max():.3g} (max), {err[~flipped].mean(1).max():.3g} (mean)")
    if flipped.any():
        assert float(err[flipped].mean(1).max()) <= 5e-3, f"{case}: images with a flip differ by {err[flipped].mean(1)}"


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_model_sampling_is_pinned(case, reference, pin_machine):
    got, want = _run_case(_demo_model(), DEMO_CASES[case]), reference[case]
    assert_near_pins(got, want, case)  # any machine
    if not pin_machine:
        return
    for key in want:
        assert torch.equal(got[key], want[key]), f"{case}/{key} changed (max diff {(got[key].float() - want[key].float()).abs().max():.3g})"


def test_dit_sampling_is_pinned(reference, pin_machine):
    got, want = _run_case(_tiny_dit(), dict(sampler="ddpm", num_sampling_steps=5, cfg_scale=3.0))["samples"], reference["dit_ddpm_cfg3"]["samples"]
    assert float(((got - want).abs() / want.abs().clamp_min(1)).max()) <= 1e-3  # another CPU: 6.8e-5; a changed call path: O(1)
    if pin_machine:
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_packed_demo_sampling_matches_the_pins(case, reference):
    """Packed execution against the (padded) pins, within :func:`assert_near_pins`' bounds. Measured
    (2026-11-30, 1 thread, the pin machine): demo_ddim_tail03 and demo_ddim_lite_eta1 keep identical
    traces and differ by ≤ 1.9e-5; in demo_ddpm_cfg4 4 of 80 kept counts differ by 1–3 tokens (images
    0 and 5, the last two steps), those images then differ by ≤ 0.10 (mean 1.2e-3), the others by ≤ 2.6e-4."""
    assert_near_pins(_run_case(_demo_model("packed"), DEMO_CASES[case]), reference[case], case)


def test_demo_command_png_is_pinned(tmp_path, reference, pin_machine):
    """Padded execution reproduces the pinned PNG bytes (on the pin machine; elsewhere its pixels
    within a mean of 0.5 of an 8-bit level); the default (packed) PNG decodes to nearly the same
    grid: mean |Δ| ≤ 0.5 of a level (a router flip may move some pixels further)."""
    from PIL import Image

    sha = _demo_png_sha256(tmp_path / "padded")
    padded = np.asarray(Image.open(tmp_path / "padded" / "samples.png")).astype(int)
    want = reference["demo_png"].numpy().astype(int)
    assert padded.shape == want.shape and float(np.abs(padded - want).mean()) <= 0.5
    if pin_machine:
        assert sha == reference["demo_png_sha256"]
    _demo_png_sha256(tmp_path / "packed", "packed")
    packed = np.asarray(Image.open(tmp_path / "packed" / "samples.png")).astype(int)
    assert padded.shape == packed.shape and float(np.abs(padded - packed).mean()) <= 0.5


def main() -> None:
    import tempfile

    torch.set_num_threads(1)  # as in the test session (tests/conftest.py)
    ref = {case: _run_case(_demo_model(), kw) for case, kw in DEMO_CASES.items()}
    ref["dit_ddpm_cfg3"] = _run_case(_tiny_dit(), dict(sampler="ddpm", num_sampling_steps=5, cfg_scale=3.0))
    with tempfile.TemporaryDirectory() as tmp:
        ref["demo_png_sha256"] = _demo_png_sha256(Path(tmp))
        from PIL import Image

        ref["demo_png"] = torch.from_numpy(np.asarray(Image.open(Path(tmp) / "samples.png")).copy())
    ref["machine"] = machine_signature()
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, REFERENCE)
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
