"""Shared tiny-model fixtures for the model / loss / config tests.

Freshly initialised DiT-style models are degenerate for most behavioural checks: the final layer and
all adaLN gates are zero (the output is identically 0, so no gradient reaches anything upstream),
and the identity-initialised cosine router keeps a single token per sample. ``randomize_`` gives
every zero-initialised Linear small random weights and perturbs the router projections, so the
output depends on every path and samples keep different numbers of tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dcdit.config import build_model
from dcdit.models.dydit import DynamicDiTBlock

TINY_DCDIT = dict(
    arch="dcdit", input_size=8, in_channels=1, hidden_size=64, depth=2, num_heads=4,
    num_classes=10, conv_norm_groups=8,
)
TINY_DIT = dict(
    arch="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
    num_classes=10,
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests run tiny models whose ops are too small to gain from threads; one thread is as fast
    and far less sensitive to other processes on a 2-core machine (subprocesses get OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(config: dict, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({**config, **overrides})


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05, router_noise: float = 2.0) -> nn.Module:
    """Give zero-initialised Linears random weights; add noise to the cosine router's W_Q, W_K."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear) and bool((mod.weight == 0).all()):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * std)
        router = getattr(model, "router", None)
        if router is not None and hasattr(router, "q_proj"):
            D = router.q_proj.weight.shape[0]
            for lin in (router.q_proj, router.k_proj):
                lin.weight.add_(router_noise * torch.randn(D, D, generator=g) / D**0.5)
    return model


def mix_dydit_routers_(model: nn.Module, seed: int = 0, width_scale: float = 20.0, token_scale: float = 3.0) -> None:
    """DyDiT router weights that give mixed head/group/token masks that depend on t and on the token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.modules():
            if not isinstance(block, DynamicDiTBlock):
                continue
            for r in (block.attn_router, block.mlp_router):
                r.weight.copy_(torch.randn(r.weight.shape, generator=g) * width_scale)
                r.bias.copy_(torch.randn(r.bias.shape, generator=g) * 0.3)
            tr = block.token_router
            tr[2].weight.copy_(torch.randn(tr[2].weight.shape, generator=g) * token_scale)
            tr[2].bias.zero_()


def tiny_inputs(batch: int, channels: int = 1, grid=(8, 8), num_classes: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *grid, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


@pytest.fixture
def tiny_dcdit():
    """Freshly initialised tiny DC-DiT (8×8 grid, 1 channel, D = 64), eval mode."""
    return make_model(TINY_DCDIT).eval()


@pytest.fixture
def random_dcdit():
    """Tiny DC-DiT with every path live (see ``randomize_``), eval mode (no label dropout)."""
    return randomize_(make_model(TINY_DCDIT)).eval()


@pytest.fixture
def tiny_dit():
    return make_model(TINY_DIT).eval()


@pytest.fixture
def helpers():
    """The helpers above, as a fixture (test modules do not import conftest by name)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        TINY_DCDIT=TINY_DCDIT, TINY_DIT=TINY_DIT, make_model=make_model, randomize_=randomize_,
        tiny_inputs=tiny_inputs, mix_dydit_routers_=mix_dydit_routers_,
    )
