"""Pinned outputs: sampling and the demo give bit-identical results across refactors.

The reference file ``tests/fixtures/pinned_outputs.pt`` was written by this module's ``main`` on the
code of 2026-11-30 (before the orchestration refactor of issue 19), one thread, CPU. A change that
*means* to change numerics (a new kernel, a new default) regenerates it with
``python tests/test_pinned_outputs.py`` and says why in its commit message; a refactor never does.

Which wrong change each case catches: a sampler loop that reorders noise draws or guidance (DDPM and
DDIM with CFG), a lost tail-drop or Lite-CFG argument (the kept-token traces), a DiT call path that
changed (the DiT case), and the demo command's image pipeline (the PNG bytes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dcdit.checkpoint import load_model
from dcdit.cli import DEMO_CHECKPOINT, main as cli_main
from dcdit.config import build_model
from dcdit.sampling import generate

REFERENCE = Path(__file__).parent / "fixtures" / "pinned_outputs.pt"

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


def _demo_model():
    return load_model(DEMO_CHECKPOINT)[0]


def _run_case(model, kwargs) -> dict:
    res = generate(model, list(range(10)), seed=7, num_snapshots=0, **kwargs)
    out = {"samples": res.samples.clone()}
    if "kept" in res.trace[0]:
        out["kept"] = torch.stack([e["kept"] for e in res.trace])
    if "uncond_kept" in res.trace[0]:
        out["uncond_kept"] = torch.stack([e["uncond_kept"] for e in res.trace])
    return out


def _demo_png_sha256(tmp: Path) -> str:
    assert cli_main(["demo", "--out", str(tmp), "--sampling-steps", "3", "--per-class", "1", "--no-progress"]) == 0
    return hashlib.sha256((tmp / "samples.png").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference():
    return torch.load(REFERENCE, weights_only=True)


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_model_sampling_is_pinned(case, reference):
    got = _run_case(_demo_model(), DEMO_CASES[case])
    for key, want in reference[case].items():
        assert torch.equal(got[key], want), f"{case}/{key} changed (max diff {(got[key].float() - want.float()).abs().max():.3g})"


def test_dit_sampling_is_pinned(reference):
    got = _run_case(_tiny_dit(), dict(sampler="ddpm", num_sampling_steps=5, cfg_scale=3.0))
    assert torch.equal(got["samples"], reference["dit_ddpm_cfg3"]["samples"])


def test_demo_command_png_is_pinned(tmp_path, reference):
    assert _demo_png_sha256(tmp_path) == reference["demo_png_sha256"]


def main() -> None:
    import tempfile

    torch.set_num_threads(1)  # as in the test session (tests/conftest.py)
    ref = {case: _run_case(_demo_model(), kw) for case, kw in DEMO_CASES.items()}
    ref["dit_ddpm_cfg3"] = _run_case(_tiny_dit(), dict(sampler="ddpm", num_sampling_steps=5, cfg_scale=3.0))
    with tempfile.TemporaryDirectory() as tmp:
        ref["demo_png_sha256"] = _demo_png_sha256(Path(tmp))
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, REFERENCE)
    print(f"wrote {REFERENCE}")


if __name__ == "__main__":
    main()
