"""The DiT block without MLP (the release's ``d`` block, ``DiTBlock(has_mlp=False)``), against the same
block with its MLP silenced: zeroing fc2 (weight and bias) makes the MLP output exactly 0, so a block
with an MLP then computes x + gate_msa · attn(modulate(norm1 x)) + gate_mlp · 0, which is what a ``d``
block must compute. Both token layouts (padded with a key mask, packed) are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from dcdit.models.dit_block import DiTBlock, inner_mlp_flags
from dcdit.models.packing import Packing

D, HEADS = 32, 4


def _blocks(seed: int = 0) -> tuple[DiTBlock, DiTBlock, DiTBlock]:
    """(``d`` block, ``D`` block with fc2 = 0, the same ``D`` block with its MLP live), sharing the
    norm1/attn/adaLN weights, all random."""
    torch.manual_seed(seed)
    full = DiTBlock(D, HEADS, mlp_ratio=2.0)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn_like(p) * 0.3)  # adaLN-Zero would make both blocks the identity
    no_mlp = DiTBlock(D, HEADS, mlp_ratio=2.0, has_mlp=False)
    missing, unexpected = no_mlp.load_state_dict(full.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight"]
    silenced = copy.deepcopy(full)
    with torch.no_grad():
        silenced.mlp.fc2.weight.zero_()
        silenced.mlp.fc2.bias.zero_()
    return no_mlp, silenced, full


def test_a_block_without_mlp_has_the_release_parameters():
    """The release's HNetDiTBlock(has_mlp=False): no norm2, no mlp, adaLN still D -> 6D."""
    block = DiTBlock(D, HEADS, has_mlp=False)
    assert sorted(block.state_dict()) == ["adaLN_modulation.1.bias", "adaLN_modulation.1.weight", "attn.proj.bias",
                                          "attn.proj.weight", "attn.qkv.bias", "attn.qkv.weight"]
    assert block.adaLN_modulation[1].weight.shape == (6 * D, D)
    assert not hasattr(block, "mlp") and not hasattr(block, "norm2")


def test_no_mlp_block_equals_a_block_whose_mlp_outputs_zero_padded_and_packed():
    """Catches a ``d`` block that drops the attention too, reads the MLP's gate/shift/scale rows for the
    attention, or mis-expands the modulators in the packed layout; and the silenced block really differs
    from the full one (the MLP is not already a no-op on these weights)."""
    no_mlp, silenced, full = _blocks()
    lengths = [5, 2, 7]
    B, M = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(B, M, D, generator=g), torch.randn(B, D, generator=g)
    mask = torch.arange(M)[None] < torch.tensor(lengths)[:, None]  # (B, M) real slots
    with torch.no_grad():
        ours = no_mlp(x, c, mask)
        reference = silenced(x, c, mask)
        torch.testing.assert_close(ours[mask], reference[mask], rtol=0, atol=1e-6)
        packing = Packing.from_counts(torch.tensor(lengths))
        packed = no_mlp(x[mask], c, packing)  # (T, D): the real rows, sample after sample
        torch.testing.assert_close(packed, ours[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(packed, silenced(x[mask], c, packing), rtol=0, atol=1e-6)
        # the closed form, written out: x + gate_msa · attn(norm1(x)·(1 + scale_msa) + shift_msa)
        shift, scale, gate = no_mlp.adaLN_modulation(c).chunk(6, dim=1)[:3]
        h = no_mlp.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        by_hand = x + gate[:, None] * no_mlp.attn(h, mask)
        torch.testing.assert_close(ours[mask], by_hand[mask], rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (full(x, c, mask) - reference)[mask].abs().max() > 1e-3


def test_no_mlp_block_gradients_equal_the_silenced_block():
    """Training: the same gradients reach x, c and every shared parameter (the unused MLP rows of the
    adaLN Linear get exactly zero from both)."""
    no_mlp, silenced, _ = _blocks(seed=2)
    x = torch.randn(2, 6, D, requires_grad=True)
    c = torch.randn(2, D, requires_grad=True)
    grads = []
    for block in (no_mlp, silenced):
        x.grad = c.grad = None
        block.zero_grad()
        (block(x, c) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum().backward()
        grads.append({"x": x.grad.clone(), "c": c.grad.clone(),
                      **{n: p.grad.clone() for n, p in block.named_parameters() if not n.startswith("mlp.")}})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-5, msg=name)
    assert grads[0]["adaLN_modulation.1.weight"][3 * D:].abs().max() == 0  # shift/scale/gate of the MLP: unused


@pytest.mark.parametrize("value, depth, message", [
    ([True, False], 3, r"model.inner_mlp has 2 entries; it needs one per inner block \(model.depth = 3\)"),
    ("dD", 2, "model.inner_mlp must be null or a list of true/false"),
    ([1, 0], 2, "model.inner_mlp must be null or a list of true/false"),
])
def test_inner_mlp_flags_refuse_in_one_line(value, depth, message):
    with pytest.raises(ValueError, match=message) as err:
        inner_mlp_flags(value, depth)
    assert "\n" not in str(err.value)
    assert inner_mlp_flags(None, 3) == [True] * 3 and inner_mlp_flags((False, True), 2) == [False, True]
