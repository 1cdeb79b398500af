"""The official fixtures (tests/fixtures/release/, made by running the authors' release on CPU; their
README is shared/fixtures/README.md of the steering repository, summarised in docs/release.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent.parent / "fixtures" / "release"
MODEL_REF = FIXTURES / "amd_dcdit_small.pt"  # config A: a whole official model with random weights, its outputs
# amd_checkpoint_small.pt: the same weights in the format the release's train.py writes (read by test_checkpoint.py)
CHECKPOINT_EXPECTED = FIXTURES / "amd_checkpoint_small_expected.pt"  # outputs of its "ema" weights


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> bool:
    """|ours − ref| <= tol · max(1, |ref|) elementwise: the parity tolerance of issue 16."""
    return bool(((ours.float() - ref.float()).abs() <= tol * ref.float().abs().clamp_min(1.0)).all())


@pytest.fixture(scope="session")
def ref():
    return torch.load(MODEL_REF, weights_only=True)


@pytest.fixture(scope="session")
def expected():
    return torch.load(CHECKPOINT_EXPECTED, weights_only=True)


@pytest.fixture
def release_model(ref):
    from dcdit.release import model_from_release

    return model_from_release(ref["state_dict"], ref["config"])


@pytest.fixture(scope="session")
def close():
    """The parity check as a fixture (test modules do not import conftest by name)."""
    return _close
