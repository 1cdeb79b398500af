"""DyDiT gates in DC-DiT's inner blocks (models/dydit.py).

Independent references: the ungated DC-DiT with the same weights (all gates on), a loop-per-sample,
per-head, per-token re-implementation of a gated block written from the definitions (masks from the
router weights, softmax over real keys, MLP over the active hidden units only), hand-computed MAC
counts and FLOPs-loss values (literal numbers), and the logistic CDF for the Gumbel-sigmoid keep rate.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.config import model_config_from_dict
from dcdit.flops import dcdit_macs, dydit_block_macs, record_macs, sampling_flops
from dcdit.models.dydit import (
    DyDiTRecord, DynamicDiTBlock, dydit_flops_loss, dydit_flops_ratio, dydit_router_parameters, dydit_usage,
    flops_target, gumbel_sigmoid, set_dydit_execution,
)
from dcdit.models.packing import Packing

ROUTER_KEYS = ("attn_router.", "mlp_router.", "token_router.")


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture
def pair(helpers):
    """(ungated DC-DiT with every path live, DyDiT DC-DiT with the same weights), no label dropout."""
    cfg = dict(helpers.TINY_DCDIT, class_dropout_prob=0.0)
    base = helpers.randomize_(helpers.make_model(cfg, seed=0))
    dyn = helpers.make_model(dict(cfg, dydit=True), seed=1)
    missing, unexpected = dyn.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(any(k in name for k in ROUTER_KEYS) for name in missing)
    assert sorted(missing) == sorted(n for n, _ in dydit_router_parameters(dyn))
    return base, dyn, model_config_from_dict(dict(cfg, dydit=True))


def padded_inputs(helpers, model, batch=4, seed=1):
    """Inputs whose samples keep different token counts (so the inner batch is padded)."""
    for s in range(seed, seed + 50):
        x, t, y = helpers.tiny_inputs(batch, seed=s)
        with torch.no_grad():
            model.eval()
            _, rec = model(x, t, y)
        if len(set(rec.kept_count.tolist())) > 1:
            return x, t, y
    raise AssertionError("no padded batch found")


# ------------------------------------------------------------------------------- Gumbel-sigmoid


def test_gumbel_sigmoid_eval_is_a_deterministic_threshold():
    logits = torch.tensor([-20.0, -1.0, -1e-4, 1e-4, 0.3, 2.0, 40.0])
    out = gumbel_sigmoid(logits, tau=5.0, threshold=0.5, training=False)
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 1, 1, 1, 1]))
    assert torch.equal(out, gumbel_sigmoid(logits, tau=5.0, training=False))  # no randomness
    # threshold 0.7 on sigmoid(logit / τ): logit > τ · log(0.7 / 0.3) = 4.236...
    out = gumbel_sigmoid(torch.tensor([4.2, 4.3]), tau=5.0, threshold=0.7, training=False)
    assert torch.equal(out, torch.tensor([0.0, 1.0]))


def test_gumbel_sigmoid_train_keep_rate_is_sigmoid_of_logit():
    logits = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = gumbel_sigmoid(logits.expand(n, -1), tau=5.0, training=True, generator=g)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    rate = draws.mean(0)
    for lg, r in zip(logits.tolist(), rate.tolist()):
        p = 1 / (1 + math.exp(-lg))  # logistic CDF: P(logit + noise > 0)
        assert abs(r - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-3, (lg, r, p)


def test_gumbel_sigmoid_straight_through_gradient():
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0]).repeat(200).requires_grad_(True)
    out = gumbel_sigmoid(logits, tau=5.0, training=True, generator=torch.Generator().manual_seed(1))
    assert set(out.detach().unique().tolist()) <= {0.0, 1.0}  # exactly hard in the forward pass
    out.sum().backward()
    # d sigmoid(z/τ)/d logit = s(1 − s)/τ ∈ (0, 1/(4τ)]
    assert (logits.grad > 0).all() and (logits.grad <= 1 / 20 + 1e-7).all()
    assert gumbel_sigmoid(logits, training=False).requires_grad is False


# ------------------------------------------------------------------------------- all gates on


@pytest.mark.parametrize("sliced", [True, False])
def test_fresh_gates_equal_ungated_model_in_eval(helpers, pair, sliced):
    base, dyn, _ = pair
    x, t, y = padded_inputs(helpers, base)
    base.eval(), dyn.eval()
    set_dydit_execution(dyn, sliced)
    with torch.no_grad():
        ref, rec_b = base(x, t, y)
        out, rec = dyn(x, t, y)
    assert rec_b.dydit is None
    assert torch.equal(rec.kept_count, rec_b.kept_count) and len(set(rec.kept_count.tolist())) > 1
    assert (out - ref).abs().max() <= 1e-5
    d = rec.dydit
    assert (d.head_mask == 1).all() and (d.group_mask == 1).all()
    assert torch.equal(d.tokens, rec.kept_count)
    assert torch.equal(d.mlp_tokens, rec.kept_count.float().expand(d.depth, -1))  # padding never counted


def test_fresh_gates_equal_ungated_model_in_training_with_noise(helpers, pair):
    base, dyn, cfg = pair
    x, t, y = padded_inputs(helpers, base)
    base.train(), dyn.train()
    torch.manual_seed(5)
    ref, _ = base(x, t, y)
    torch.manual_seed(5)
    out, rec = dyn(x, t, y)
    d = rec.dydit
    assert d.head_mask.requires_grad and d.token_mask.requires_grad  # the noisy STE path ran
    assert (d.head_mask == 1).all() and (d.group_mask == 1).all()
    assert torch.equal(d.token_mask.sum(-1), rec.kept_count.float().expand(d.depth, -1))
    assert (out - ref).abs().max() <= 1e-5
    assert abs(float(dydit_flops_ratio(rec, cfg).detach().mean()) - 1.0) < 1e-6


# ------------------------------------------------------------------------------- sliced vs masked


@pytest.mark.parametrize("shared_t", [True, False])
def test_sliced_inference_equals_masked_execution(helpers, pair, shared_t):
    _, dyn, _ = pair
    x, t, y = padded_inputs(helpers, dyn, batch=5)
    if shared_t:
        t = torch.full_like(t, int(t[0]))  # one sampling step: one sub-network for the whole batch
    else:
        t = torch.tensor([3, 3, 400, 999, 650])[: len(t)]
    helpers.mix_dydit_routers_(dyn)
    dyn.eval()
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for b in dyn.blocks for m in (b.attn.qkv, b.mlp.fc1)]
    with torch.no_grad():
        set_dydit_execution(dyn, True)
        out_s, rec_s = dyn(x, t, y)
        n_sliced = len(calls)
        set_dydit_execution(dyn, False)
        out_m, rec_m = dyn(x, t, y)
    for h in hooks:
        h.remove()
    assert n_sliced == 0  # the full-width modules never ran in the sliced path
    assert len(set(rec_s.kept_count.tolist())) > 1  # padded batch
    d = rec_s.dydit
    for name in ("head_mask", "group_mask", "token_mask"):
        assert torch.equal(getattr(d, name), getattr(rec_m.dydit, name))
    # the masks are really mixed: some heads / groups / real tokens off, some on beyond index 0
    assert 0 < float(d.head_mask[:, :, 1:].mean()) < 1 and 0 < float(d.group_mask[:, :, 1:].mean()) < 1
    real = d.real_mask.expand_as(d.token_mask)
    assert 0 < float(d.token_mask[real].mean()) < 1 and (d.token_mask[~real] == 0).all()
    patterns = {tuple(r) for r in d.head_mask[0].tolist()}
    assert (len(patterns) == 1) if shared_t else (len(patterns) > 1)
    assert (out_s - out_m).abs().max() <= 1e-5


# ------------------------------------------------------------------------------- one block vs a reference


def _random_block(D=32, H=4, mlp_ratio=2.0, seed=0):
    torch.manual_seed(seed)
    blk = DynamicDiTBlock(D, H, mlp_ratio, token_hidden_ratio=0.25)  # token router width 8
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.3)
        blk.token_router[2].bias.zero_()  # about half of the tokens run the MLP
        for r in (blk.attn_router, blk.mlp_router):  # mixed widths that depend on t_emb
            r.bias.zero_()
    return blk.eval()


def reference_block(blk: DynamicDiTBlock, x, c, kv_mask, t_emb):
    """The gated block from its definition, one sample / head / token at a time."""
    B, M, D = x.shape
    H = blk.num_heads
    hd = D // H
    hidden = blk.mlp.fc1.out_features
    size = hidden // H
    ada = F.linear(F.silu(c), blk.adaLN_modulation[1].weight, blk.adaLN_modulation[1].bias)
    out = torch.empty_like(x)
    for b in range(B):
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = ada[b].chunk(6)
        heads = [0] + [i + 1 for i in range(H - 1) if float(blk.attn_router.weight[i] @ t_emb[b] + blk.attn_router.bias[i]) > 0]
        groups = [0] + [i + 1 for i in range(H - 1) if float(blk.mlp_router.weight[i] @ t_emb[b] + blk.mlp_router.bias[i]) > 0]
        real = [j for j in range(M) if kv_mask[b, j]]
        xb = x[b]
        hn = F.layer_norm(xb, (D,), eps=1e-6) * (1 + sc_msa) + s_msa
        attn = torch.zeros(M, D)
        Wqkv, bqkv = blk.attn.qkv.weight, blk.attn.qkv.bias
        for h in heads:
            q = hn @ Wqkv[h * hd:(h + 1) * hd].T + bqkv[h * hd:(h + 1) * hd]
            k = hn @ Wqkv[D + h * hd:D + (h + 1) * hd].T + bqkv[D + h * hd:D + (h + 1) * hd]
            v = hn @ Wqkv[2 * D + h * hd:2 * D + (h + 1) * hd].T + bqkv[2 * D + h * hd:2 * D + (h + 1) * hd]
            w = torch.softmax((q @ k[real].T) / math.sqrt(hd), dim=-1)
            attn += (w @ v[real]) @ blk.attn.proj.weight[:, h * hd:(h + 1) * hd].T
        xa = xb + g_msa * (attn + blk.attn.proj.bias)
        units = [u for g in groups for u in range(g * size, (g + 1) * size)]
        res = xa.clone()
        tr = blk.token_router
        for j in real:
            logit = tr[2].weight[0] @ torch.relu(tr[0].weight @ xa[j] + tr[0].bias) + tr[2].bias[0]
            if float(logit) > 0:
                hm = F.layer_norm(xa[j], (D,), eps=1e-6) * (1 + sc_mlp) + s_mlp
                a = F.gelu(blk.mlp.fc1.weight[units] @ hm + blk.mlp.fc1.bias[units], approximate="tanh")
                res[j] = xa[j] + g_mlp * (blk.mlp.fc2.weight[:, units] @ a + blk.mlp.fc2.bias)
        out[b] = res
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("sliced", [True, False])
def test_block_matches_reference_on_mixed_batch(sliced, layout):
    """Padded (B, M, D) with a key mask, or the real tokens packed (T, D): the packed block must expand
    every per-sample vector (modulators, head/group masks) to its own sample's rows and select the
    right rows for each head pattern in sliced inference."""
    blk = _random_block()
    blk.sliced_inference = sliced
    B, M, D = 3, 7, 32
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(B, M, D, generator=g), torch.randn(B, D, generator=g)
    t_emb = torch.randn(B, D, generator=g)
    t_emb[1] = t_emb[0]  # samples 0 and 1 share a timestep, sample 2 does not
    kv_mask = torch.arange(M)[None] < torch.tensor([7, 5, 3])[:, None]
    stats = []
    with torch.no_grad():
        ref = reference_block(blk, x, c, kv_mask, t_emb)
        if layout == "padded":
            out = blk(x, c, kv_mask, t_emb=t_emb, stats=stats)
            tok = stats[0].token_mask
        else:
            packing = Packing.from_counts(kv_mask.sum(1))
            out = packing.to_padded(blk(x[kv_mask], c, packing, t_emb=t_emb, stats=stats), M)
            tok = packing.to_padded(stats[0].token_mask, M)
            ref = torch.where(kv_mask[..., None], ref, 0.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # fp32 rounding scales with |out| (CPU kernels differ)
    assert 0 < float(tok[kv_mask].mean()) < 1 and (tok[~kv_mask] == 0).all()
    assert 0 < float(stats[0].head_mask[:, 1:].mean()) < 1


@pytest.mark.parametrize("sliced", [True, False])
def test_tokens_that_skip_the_mlp_are_unchanged_and_padding_never_counts(sliced):
    blk = _random_block(seed=1)
    blk.sliced_inference = sliced
    D = 32
    with torch.no_grad():  # gate_msa = 0: the attention sub-layer adds exactly nothing
        blk.adaLN_modulation[1].weight[2 * D:3 * D] = 0
        blk.adaLN_modulation[1].bias[2 * D:3 * D] = 0
    B, M = 3, 9
    g = torch.Generator().manual_seed(4)
    x, c, t_emb = torch.randn(B, M, D, generator=g), torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    kv_mask = torch.arange(M)[None] < torch.tensor([9, 6, 2])[:, None]
    stats = []
    with torch.no_grad():
        out = blk(x, c, kv_mask, t_emb=t_emb, stats=stats)
    tok = stats[0].token_mask.bool()
    assert tok.any() and (kv_mask & ~tok).any()
    assert not (tok & ~kv_mask).any()
    assert torch.equal(out[~tok], x[~tok])  # skipped tokens and padding: bit-identical
    assert ((out[tok] - x[tok]).abs().amax(-1) > 0).all()
    # every real token on: the token count is the real count, padding excluded
    with torch.no_grad():
        blk.token_router[2].weight.zero_()
        blk.token_router[2].bias.fill_(35.0)
        stats = []
        out = blk(x, c, kv_mask, t_emb=t_emb, stats=stats)
    assert torch.equal(stats[0].token_mask.sum(1), torch.tensor([9.0, 6.0, 2.0]))
    assert torch.equal(out[~kv_mask], x[~kv_mask])


def test_block_requires_timestep_embedding():
    blk = _random_block()
    with pytest.raises(ValueError, match="t_emb"):
        blk(torch.randn(1, 2, 32), torch.randn(1, 32))


# ------------------------------------------------------------------------------- FLOP counts


def _cfg(**kw):
    base = dict(arch="dcdit", input_size=8, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                conv_norm_groups=8)
    return model_config_from_dict({**base, **kw})


def test_dydit_block_macs_hand_computed():
    cfg = _cfg(dydit=True)  # D = 64, H = 4, mlp hidden 256 (groups of 64), token router width 4
    got = dydit_block_macs(cfg, tokens=10, heads_on=2, groups_on=3, mlp_tokens=7)
    assert got == {
        "blocks.attention_linear": 10 * 64 * 96 + 10 * 32 * 64,  # = 81920 = 4·D²·M·(2/4)
        "blocks.attention_matmul": 6400,  # 2·M²·(2 heads · 16)
        "blocks.mlp": 7 * (64 * 192 + 192 * 64),  # 172032
        "blocks.adaLN": 24576,
        "blocks.dydit_routers": 2 * 64 * 3 + 10 * 64 * 4 + 10 * 4,  # 2984
    }
    assert got["blocks.attention_linear"] == 81920 and got["blocks.mlp"] == 172032
    with pytest.raises(ValueError):
        dydit_block_macs(cfg, 10, 0, 3, 7)
    with pytest.raises(ValueError):
        dydit_block_macs(cfg, 10, 2, 3, 11)


def test_dcdit_macs_with_dydit_usage():
    plain, dy = _cfg(), _cfg(dydit=True)
    M = 12
    router = 2 * 64 * 3 + M * (64 * 4 + 4)
    assert dcdit_macs(dy, M).total == dcdit_macs(plain, M).total + 2 * router  # all on: + the routers
    usage = [(4, 4, M), (1, 2, 5)]
    full_block = 4 * 64 * 64 * M + 2 * M * M * 64 + 2 * 64 * 256 * M + 6 * 64 * 64 + router
    second = 4 * 64 * 64 * M // 4 + 2 * M * M * 64 // 4 + 2 * 64 * 128 * 5 + 6 * 64 * 64 + router
    blocks = sum(v for k, v in dcdit_macs(dy, M, usage).components.items() if k.startswith("blocks."))
    assert blocks == full_block + second
    assert dcdit_macs(dy, M, usage).total - blocks == dcdit_macs(plain, M).total - sum(
        v for k, v in dcdit_macs(plain, M).components.items() if k.startswith("blocks."))
    with pytest.raises(ValueError):
        dcdit_macs(plain, M, usage)
    with pytest.raises(ValueError):
        dcdit_macs(dy, M, usage[:1])


def test_record_macs_and_sampling_flops_count_executed_gates(helpers, pair):
    _, dyn, cfg = pair
    x, t, y = padded_inputs(helpers, dyn)
    helpers.mix_dydit_routers_(dyn)
    dyn.eval()
    with torch.no_grad():
        _, rec = dyn(x, t, y)
    D, H, hidden, r = 64, 4, 256, 4
    per_sample = record_macs(cfg, rec)
    for b, bd in enumerate(per_sample):
        M = int(rec.kept_count[b])
        want = 0
        for l in range(cfg.depth):
            h = int(rec.dydit.head_mask[l, b].sum())
            g = int(rec.dydit.group_mask[l, b].sum())
            n = int(rec.dydit.token_mask[l, b].sum())
            want += (4 * D * D * M * h // H + 2 * M * M * D * h // H + 2 * D * (hidden // H * g) * n + 6 * D * D
                     + 2 * D * (H - 1) + M * (D * r + r))
        assert sum(v for k, v in bd.components.items() if k.startswith("blocks.")) == want
    # a sampling trace carrying the usage: each image charged its own executed count per step
    usage = dydit_usage(rec)
    trace = [{"kept": rec.kept_count, "dydit": usage}, {"kept": rec.kept_count, "dydit": usage}]
    res = sampling_flops(cfg, trace, cfg_guidance=False)
    assert res["macs_per_image_each"] == [2 * bd.total for bd in per_sample]


# ------------------------------------------------------------------------------- FLOPs loss


def test_flops_loss_closed_form():
    cfg = SimpleNamespace(hidden_size=8, num_heads=4, mlp_ratio=4.0)  # hidden 32, per-token MLP 512 MACs
    rec = DyDiTRecord(
        head_mask=torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 0, 1]]], dtype=torch.float),
        group_mask=torch.tensor([[[1, 0, 1, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [1, 1, 1, 0]]], dtype=torch.float),
        token_mask=torch.tensor([[[1, 0, 1], [1, 1, 0]], [[0, 0, 0], [0, 1, 0]]], dtype=torch.float),
        real_mask=torch.tensor([[True, True, True], [True, True, False]]),
    )
    # sample 0, M = 3: attention 4·64·3 + 2·9·8 = 912; static 2·(912 + 3·512) = 4896;
    #   dyn = (2/4)·912 + (2/4)·2·512 + 912 + (1/4)·0·512 = 1880
    # sample 1, M = 2: attention 512 + 64 = 576; static 2·(576 + 1024) = 3200;
    #   dyn = (1/4)·576 + 1·2·512 + (3/4)·576 + (3/4)·1·512 = 1984
    r0, r1 = Fraction(1880, 4896), Fraction(1984, 3200)
    ratio = dydit_flops_ratio(rec, cfg)
    assert torch.allclose(ratio, torch.tensor([float(r0), float(r1)]), atol=1e-7)
    want = float(((r0 + r1) / 2 - Fraction(7, 10)) ** 2)
    assert abs(float(dydit_flops_loss(rec, cfg, 0.7)) - want) < 1e-7
    with pytest.raises(ValueError, match="dydit"):
        dydit_flops_loss(SimpleNamespace(dydit=None), cfg, 0.7)


def test_flops_loss_gradient_reaches_the_routers(helpers, pair):
    _, dyn, cfg = pair
    x, t, y = padded_inputs(helpers, dyn)
    dyn.train()
    _, rec = dyn(x, t, y)
    loss = dydit_flops_loss(rec, cfg, 0.5)  # ratio 1.0 > 0.5: every logit should go down
    assert float(loss.detach()) == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    for blk in dyn.blocks:
        for router in (blk.attn_router, blk.mlp_router):
            assert (router.bias.grad > 0).all()
            assert router.weight.grad.abs().sum() > 0
        assert float(blk.token_router[2].bias.grad) > 0
        assert blk.token_router[2].weight.grad.abs().sum() > 0


def test_flops_target_schedule():
    assert [flops_target(s, 1000, 0.7) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert flops_target(100, 1000, 0.7) == pytest.approx(0.97)
    assert flops_target(500, 1000, 0.7) == pytest.approx(0.85)
    assert flops_target(1000, 1000, 0.7) == pytest.approx(0.7)
    assert flops_target(120_000, 1000, 0.7) == 0.7
    assert flops_target(99, 0, 0.7) == 1.0 and flops_target(100, 0, 0.7) == 0.7


# ------------------------------------------------------------------------------- records


def test_record_survives_lite_cfg_and_split(helpers, pair):
    _, dyn, _ = pair
    helpers.mix_dydit_routers_(dyn)
    dyn.eval()
    x, t, y = helpers.tiny_inputs(3)
    t = torch.full_like(t, 500)
    with torch.no_grad():
        _, rec = dyn.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), cfg_scale=1.5,
                                      tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.5)
    d = rec.dydit
    assert d.head_mask.shape[1] == 6 and d.real_mask.shape[1] == rec.kept_idx.shape[1]
    assert torch.equal(d.tokens, rec.kept_count)
    cond, unc = rec.split(2)
    assert torch.equal(cond.dydit.tokens, cond.kept_count) and torch.equal(unc.dydit.tokens, unc.kept_count)
    assert torch.equal(cond.dydit.head_mask, unc.dydit.head_mask)  # same t: same width
    assert len(dydit_usage(cond)) == 3 and len(dydit_usage(cond)[0]) == dyn.blocks.__len__()


def test_config_switch_builds_dynamic_blocks():
    cfg = model_config_from_dict({"preset": "DC-DiT-B/N4", "dydit": "true", "depth": 1})
    assert cfg.dydit is True and cfg.dydit_tau == 5.0
    from dcdit.config import build_model

    model = build_model(dict(_cfg(dydit=True).__dict__))
    assert all(isinstance(b, DynamicDiTBlock) for b in model.blocks)
    assert not any(isinstance(b, DynamicDiTBlock) for b in build_model(dict(_cfg().__dict__)).blocks)
