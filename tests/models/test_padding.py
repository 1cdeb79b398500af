"""``mask_padding: false``: the paper's literal batched chunking (§3.3, "Batched chunking and padding"):
every sample is padded to the batch's largest kept count with its next-highest-p tokens and the inner
blocks attend over all of them, padding included. Checked against a brute-force DiT block written out
from the block's weights; with ``mask_padding: true`` (the default, equal to the release's packed
attention) the same sample computes what it computes alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _block_by_hand(block, z, c):
    """One DiT block over all M slots of (B, M, D), no mask: adaLN-Zero, softmax attention, tanh-GELU MLP."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in block.adaLN_modulation(c).chunk(6, dim=1))
    B, M, D = z.shape
    H = block.attn.num_heads
    u = F.layer_norm(z, (D,), eps=1e-6) * (1 + scale1) + shift1
    q, k, v = (block.attn.qkv(u).reshape(B, M, 3, H, D // H)[:, :, i].transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5, dim=-1) @ v
    z = z + gate1 * block.attn.proj(a.transpose(1, 2).reshape(B, M, D))
    u = F.layer_norm(z, (D,), eps=1e-6) * (1 + scale2) + shift2
    return z + gate2 * block.mlp.fc2(F.gelu(block.mlp.fc1(u), approximate="tanh"))


def test_unmasked_padding_attends_over_every_slot(helpers):
    model = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, mask_padding=False, depth=1)).eval()
    x, t, y = helpers.tiny_inputs(2, seed=3)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.update(inp=a[0], c=a[1], out=o))
    with torch.no_grad():
        _, record = model(x, t, y, tail_dropping_fraction=torch.tensor([0.0, 0.6]))
        assert record.kept_count[0] != record.kept_count[1]  # one sample is padded
        assert torch.allclose(seen["out"], _block_by_hand(model.blocks[0], seen["inp"], seen["c"]), atol=1e-5)
        # and the padded sample's real tokens see its padding: masking it changes them
        masked = helpers.randomize_(helpers.make_model(helpers.TINY_DCDIT, mask_padding=True, depth=1)).eval()
        out_unmasked, _ = model(x, t, y, tail_dropping_fraction=torch.tensor([0.0, 0.6]))
        out_masked, _ = masked(x, t, y, tail_dropping_fraction=torch.tensor([0.0, 0.6]))
        alone, _ = masked(x[1:], t[1:], y[1:], tail_dropping_fraction=0.6)
    short = int(record.kept_count.argmin())
    assert not torch.allclose(out_unmasked[short], out_masked[short], atol=1e-4)
    assert torch.allclose(out_masked[1:], alone, atol=1e-5)
