"""FLOP accounting (dcdit.flops) against independent references.

1. The DiT paper's published Gflops (which are MACs).
2. Tiny configs counted by hand, written out as arithmetic from the architecture.
3. A measurement of the real model: forward hooks on nn.Linear / nn.Conv2d plus wrappers around
   the functional matmuls (attention, the de-chunk's bmm, the router's functional conv), attributed
   to the module that made the call.
4. Closed-form totals of synthetic sampling traces.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.config import DCDiTConfig, DiTConfig, build_model, get_preset
from dcdit.flops import (
    dcdit_macs,
    dit_depth_for_flops,
    dit_macs,
    flops_report,
    flops_table,
    model_macs,
    record_macs,
    sampling_flops,
)

# ------------------------------------------------------------------------------------------------
# 1. The DiT paper (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", Table 4:
#    Gflops of one forward pass at 256×256, i.e. a 32×32×4 latent; counted with fvcore = MACs).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, paper_gmacs", [("DiT-XL/2", 118.6), ("DiT-B/2", 23.0), ("DiT-XL/4", 29.1)])
def test_dit_reproduces_paper_gflops(name, paper_gmacs):
    macs = dit_macs(get_preset(name)).total
    assert abs(macs / 1e9 - paper_gmacs) / paper_gmacs < 0.01


def test_tflops_per_image_of_dit_xl2_matches_dc_dit_paper_convention():
    # DC-DiT paper: TFLOPs/img = 2 × MACs × 250 steps; DiT-XL/2 → 59 TFLOPs/img (paper §4.2).
    macs = dit_macs(get_preset("DiT-XL/2")).total
    trace = [{"kept": torch.tensor([256]), "natural": torch.tensor([256]), "tokens": 1024}] * 250
    res = sampling_flops(get_preset("DiT-XL/2"), trace, cfg_guidance=False)
    assert res["tflops_per_image"] == pytest.approx(2 * macs * 250 / 1e12)
    assert round(res["tflops_per_image"]) == 59


# ------------------------------------------------------------------------------------------------
# 2. Hand-computed tiny configs.
# ------------------------------------------------------------------------------------------------

TINY_DIT = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
TINY_DC = DCDiTConfig(input_size=(4, 6), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                      conv_norm_groups=8)  # d = 32 / 4 = 8, L = 24; packed execution (the default)
TINY_DC_PADDED = dataclasses.replace(TINY_DC, execution="padded")


def test_tiny_dit_by_hand():
    T, D, C_in, C_out, P = 16, 32, 4, 8, 2  # (8/2)² patches, learned sigma doubles the channels
    expected = {
        "x_embedder": T * D * C_in * P * P,  # 8192
        "t_embedder": 256 * D + D * D,  # 9216
        "y_embedder": 0,
        "blocks.attention_linear": T * D * 3 * D + T * D * D,  # 65536
        "blocks.attention_matmul": 2 * T * T * D,  # 16384
        "blocks.mlp": T * D * 4 * D + T * 4 * D * D,  # 131072
        "blocks.adaLN": D * 6 * D,  # 6144
        "final_layer": D * 2 * D + T * D * P * P * C_out,  # 2048 + 16384
    }
    b = dit_macs(TINY_DIT)
    assert b.components == expected
    assert b.total == 254976


def test_tiny_dcdit_by_hand():
    L, D, d, C, C_out, M = 24, 32, 8, 4, 8, 5
    enc_block1 = 9 * d * d * L + D * d + 9 * d * d * L  # (8, 8, 8): no skip conv
    enc_block2 = 9 * d * d * L + D * d + 9 * d * D * L + d * D * L  # (8, 8, 32): 1×1 skip
    dec_block1 = 9 * D * d * L + D * d + 9 * d * d * L + D * d * L  # (32, 8, 8): 1×1 skip
    dec_block2 = enc_block1
    expected = {
        "x_embedder": 9 * C * d * L,  # 6912
        "t_embedder": 256 * D + D * D,  # 9216
        "y_embedder": 0,
        "encoder": enc_block1 + enc_block2,  # 27904 + 75520
        "router": 2 * D * D * L + 9 * D * L + D * L,  # W_Q, W_K; depthwise 3×3; q·k̄ = 56832
        "chunk": 0,
        "blocks.attention_linear": 4 * D * D * M,  # 20480
        "blocks.attention_matmul": 2 * M * M * D,  # 1600
        "blocks.mlp": 8 * D * D * M,  # 40960
        "blocks.adaLN": 6 * D * D,  # 6144
        "dechunk.smoothing": 4 * 6 * (4 + 6) * (D + 1),  # the grid blur: rows (6×6) + columns (4×4), D + 1 channels
        "dechunk.plug_back": 0,  # an integer nearest-neighbour search
        "residual_proj": D * D * L,  # 24576
        "decoder": dec_block1 + dec_block2,  # 75520 + 27904
        "final_layer": D * 2 * d + L * d * C_out,  # 512 + 1536
    }
    b = dcdit_macs(TINY_DC, M)
    assert b.components == expected
    assert b.total == 383536
    assert b.total == sum(expected.values())
    # the padded reference's direct de-chunk: M×M distances and weights, L×M plug-back distances
    padded = dict(expected, **{"dechunk.smoothing": 2 * M * M + M * M * D, "dechunk.plug_back": 2 * L * M})  # 850, 240
    assert dcdit_macs(TINY_DC_PADDED, M).components == padded
    assert dcdit_macs(TINY_DC_PADDED, M).total == 376706


def test_blocks_without_mlp_by_hand():
    """``model.inner_mlp`` [false, true, false]: attention and adaLN in all three blocks, the MLP in one
    (the adaLN Linear still computes all 6D modulators in a ``d`` block). Catches an MLP charged for
    every block, or a block without MLP charged nothing at all."""
    D, M = 32, 5
    cfg = dataclasses.replace(TINY_DC, depth=3, inner_mlp=[False, True, False])
    blocks = {k: v for k, v in dcdit_macs(cfg, M).components.items() if k.startswith("blocks.")}
    assert blocks == {"blocks.attention_linear": 3 * 4 * D * D * M, "blocks.attention_matmul": 3 * 2 * M * M * D,
                      "blocks.mlp": 1 * 8 * D * D * M, "blocks.adaLN": 3 * 6 * D * D}
    rest = {k: v for k, v in dcdit_macs(TINY_DC, M).components.items() if not k.startswith("blocks.")}
    assert {k: v for k, v in dcdit_macs(cfg, M).components.items() if not k.startswith("blocks.")} == rest
    assert dcdit_macs(dataclasses.replace(cfg, inner_mlp=None), M).components["blocks.mlp"] == 3 * 8 * D * D * M


def test_routers_by_hand():
    L, D, r = 24, 32, 8
    assert dcdit_macs(dataclasses.replace(TINY_DC, router="random"), 5).components["router"] == 0
    pred = dcdit_macs(dataclasses.replace(TINY_DC, router="predictability"), 5).components["router"]
    assert pred == D * r * L + 9 * r * r * L + 9 * r * r * L + r * L


# Closed form of the tiny DC-DiT: MACs(M) = A + B·M + Q·M² (from the hand count above), packed execution.
A = 6912 + 9216 + 103424 + 56832 + 6144 + 24576 + 103424 + 2048 + 7920  # M-independent, the grid blur included
B = 4 * 32 * 32 + 8 * 32 * 32  # attention linears, MLP
Q = 2 * 32  # attention matmuls


def tiny_closed_form(M, padded: bool = False):
    if padded:  # the direct de-chunk instead of the grid blur: plug-back distances, smoothing distances and weights
        return A - 7920 + (B + 2 * 24) * M + (Q + 2 + 32) * M * M
    return A + B * M + Q * M * M


def test_closed_form_and_float_budget():
    for M in (1, 5, 24):
        assert dcdit_macs(TINY_DC, M).total == tiny_closed_form(M)
        assert dcdit_macs(TINY_DC_PADDED, M).total == tiny_closed_form(M, padded=True)
    assert dcdit_macs(TINY_DC, 5.5).total == pytest.approx(tiny_closed_form(5.5))
    with pytest.raises(ValueError):
        dcdit_macs(TINY_DC, 0)
    with pytest.raises(ValueError):
        dcdit_macs(TINY_DC, 25)


def test_model_macs_dispatch_and_nominal_budget():
    cfg = get_preset("DC-DiT-B/N4")
    assert model_macs(cfg).total == dcdit_macs(cfg, 256).total  # L / N = 1024 / 4
    assert model_macs(cfg).inner_tokens == 256
    assert model_macs(get_preset("DC-DiT-XL/N16")).inner_tokens == 64
    assert model_macs(get_preset("DiT-B/2")).total == dit_macs(get_preset("DiT-B/2")).total
    with pytest.raises(ValueError):
        model_macs(get_preset("DiT-B/2"), kept_tokens=10)


# ------------------------------------------------------------------------------------------------
# 3. Measurement on the real model.
# ------------------------------------------------------------------------------------------------


class MacMeter:
    """Counts MACs of a real forward pass, attributed to the innermost module making the call.

    nn.Linear / nn.Conv2d: forward hooks, MACs = output elements × in_features, or output elements ×
    (in_channels / groups)·kh·kw. Functional calls (F.conv2d / F.linear outside such a module,
    torch.bmm, scaled_dot_product_attention) are wrapped and measured from their operand shapes.
    """

    def __init__(self, model: nn.Module, monkeypatch):
        self.macs: Counter = Counter()
        self.stack: list[str] = []
        self.attn_lengths: list[int] = []
        self.bmm_shapes: list[tuple] = []
        self.matmul_shapes: list[tuple] = []
        self.handles = []
        for name, mod in model.named_modules():
            if not name:
                continue
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(mod.register_forward_hook(lambda m, a, o, n=name: self._post(m, o, n)))

        def functional(orig, macs_of):
            def wrapper(*args, **kwargs):
                out = orig(*args, **kwargs)
                innermost = self.stack[-1] if self.stack else "<top>"
                if not isinstance(self._module(innermost), (nn.Linear, nn.Conv2d)):
                    self.macs[innermost] += macs_of(out, *args, **kwargs)
                return out
            return wrapper

        self.modules = dict(model.named_modules())
        monkeypatch.setattr(F, "conv2d", functional(F.conv2d, lambda o, x, w, *a, **k: o.numel() * w[0].numel()))
        monkeypatch.setattr(F, "linear", functional(F.linear, lambda o, x, w, *a, **k: o.numel() * w.shape[1]))
        monkeypatch.setattr(torch, "bmm", functional(torch.bmm, self._bmm))
        monkeypatch.setattr(torch, "matmul", functional(torch.matmul, self._matmul))
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            functional(F.scaled_dot_product_attention, self._sdpa))

    def _module(self, name):
        return self.modules.get(name)

    def _post(self, mod, out, name):
        if isinstance(mod, nn.Linear):
            self.macs[name] += out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            self.macs[name] += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        self.stack.pop()

    def _bmm(self, out, a, b):
        self.bmm_shapes.append((tuple(a.shape), tuple(b.shape)))
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]

    def _matmul(self, out, a, b):
        self.matmul_shapes.append((tuple(a.shape), tuple(b.shape)))
        return out.numel() * a.shape[-1]

    def _sdpa(self, out, q, k, v, *args, **kwargs):
        self.attn_lengths.append(q.shape[-2])
        return q.shape[:-1].numel() * k.shape[-2] * q.shape[-1] + q.shape[:-1].numel() * k.shape[-2] * v.shape[-1]

    def close(self):
        for h in self.handles:
            h.remove()

    def components(self) -> dict[str, int]:
        """Measured MACs grouped into dcdit.flops' components (the de-chunk as one)."""
        out: Counter = Counter()
        for name, macs in self.macs.items():
            parts = name.split(".")
            if parts[0] == "blocks":
                if parts[2:4] in (["attn", "qkv"], ["attn", "proj"]):
                    key = "blocks.attention_linear"
                elif parts[2:] == ["attn"]:
                    key = "blocks.attention_matmul"
                elif parts[2] == "mlp":
                    key = "blocks.mlp"
                elif parts[2] == "adaLN_modulation":
                    key = "blocks.adaLN"
                else:
                    raise AssertionError(f"unexpected MACs in {name}")
            else:
                key = parts[0]
            out[key] += macs
        return dict(out)


def expected_measurable(b, dechunk_as_one: bool = True) -> dict:
    comps = {k: v for k, v in b.components.items() if v}
    if dechunk_as_one and "dechunk.smoothing" in comps:
        comps["dechunk"] = comps.pop("dechunk.smoothing") + comps.pop("dechunk.plug_back", 0)
    return comps


def test_dit_counter_matches_measured_model(monkeypatch):
    cfg = DiTConfig(input_size=(8, 12), patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10)
    model = build_model(cfg).eval()
    meter = MacMeter(model, monkeypatch)
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 12), torch.tensor([10]), torch.tensor([3]))
    meter.close()
    assert meter.attn_lengths == [24, 24]  # (8/2)·(12/2) patches in both blocks
    assert meter.components() == expected_measurable(dit_macs(cfg))


@pytest.mark.parametrize("router, fraction, execution", [
    ("random", 0.0, "padded"), ("cosine", 0.0, "padded"), ("cosine", 0.5, "padded"), ("predictability", 0.3, "padded"),
    ("random", 0.0, "packed"), ("cosine", 0.5, "packed"), ("predictability", 0.3, "packed")])
def test_dcdit_counter_matches_measured_model(monkeypatch, helpers, router, fraction, execution):
    cfg = dataclasses.replace(TINY_DC, router=router, depth=2, target_ratio=3.0, execution=execution)
    torch.manual_seed(0)
    model = helpers.randomize_(build_model(cfg)).eval()  # live router: several tokens kept
    meter = MacMeter(model, monkeypatch)
    x = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, record = model(x, torch.tensor([500]), torch.tensor([2]), tail_dropping_fraction=fraction)
    meter.close()
    M = int(record.kept_count[0])  # batch 1: the inner sequence has exactly the kept tokens
    assert 1 < M < 24
    assert meter.attn_lengths == [M, M]
    L, D = 24, 32
    if execution == "padded":  # three matmuls: M×M distances, M×M weights on D channels, L×M plug-back distances
        assert sorted(meter.bmm_shapes) == sorted([((1, M, 2), (1, 2, M)), ((1, M, M), (1, M, D)),
                                                   ((1, L, 2), (1, 2, M))])
    else:  # the grid blur: 6×6 along the 4 rows, 4×4 along the columns of 6·(D + 1) values
        assert meter.bmm_shapes == [] and meter.matmul_shapes == [((6, 6), (4, 6, D + 1)), ((4, 4), (1, 4, 6 * (D + 1)))]
    measured = meter.components()
    if router == "cosine":
        measured["router"] += D * L  # the dot q·k̄ is an elementwise product and a sum: no matmul to hook
    assert measured == expected_measurable(dcdit_macs(cfg, M))


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_dcdit_counter_matches_measured_model_with_blocks_without_mlp(monkeypatch, helpers, execution):
    """The real model with ``model.inner_mlp`` [false, true]: the hooks see no MLP call in block 0."""
    cfg = dataclasses.replace(TINY_DC, router="cosine", depth=2, target_ratio=3.0, execution=execution,
                              inner_mlp=[False, True])
    torch.manual_seed(0)
    model = helpers.randomize_(build_model(cfg)).eval()
    meter = MacMeter(model, monkeypatch)
    x = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, record = model(x, torch.tensor([500]), torch.tensor([2]), tail_dropping_fraction=0.3)
    meter.close()
    M = int(record.kept_count[0])
    assert 1 < M < 24 and not any(name.startswith("blocks.0.mlp") for name in meter.macs)
    measured = meter.components()
    measured["router"] += 32 * 24  # the cosine router's dot q·k̄: no matmul to hook (as above)
    assert measured == expected_measurable(dcdit_macs(cfg, M))


def test_dcdit_counter_matches_torch_flop_counter():
    """A second, aten-level measurement (torch's FlopCounterMode counts FLOPs = 2 × MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dataclasses.replace(TINY_DC, router="random", target_ratio=3.0)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _, record = model(torch.randn(1, 4, 4, 6), torch.tensor([7]), torch.tensor([1]))
    b = dcdit_macs(cfg, int(record.kept_count[0]))
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    # CPU scaled_dot_product_attention is not covered by every torch version's counter.
    attention = 0 if any("scaled_dot_product" in op for op in ops) else b.components["blocks.attention_matmul"]
    assert counter.get_total_flops() // 2 + attention == b.total


# ------------------------------------------------------------------------------------------------
# 4. Sampling traces.
# ------------------------------------------------------------------------------------------------


def _trace(kept, uncond=None):
    steps = []
    for k, row in enumerate(kept):
        entry = {"t": 100 - k, "step": k, "kept": torch.tensor(row), "natural": torch.tensor(row), "tokens": 24}
        if uncond is not None:
            entry["uncond_kept"] = torch.tensor(uncond[k])
            entry["uncond_natural"] = torch.tensor(uncond[k])
        steps.append(entry)
    return steps


def test_sampling_flops_closed_form():
    kept = [[5, 7], [6, 6], [4, 8]]  # 3 steps, 2 images
    res = sampling_flops(TINY_DC, _trace(kept), cfg_guidance=False)
    img0 = 3 * A + B * (5 + 6 + 4) + Q * (25 + 36 + 16)
    img1 = 3 * A + B * (7 + 6 + 8) + Q * (49 + 36 + 64)
    assert res["images"] == 2 and res["steps"] == 3 and res["forward_passes_per_image"] == 3
    assert res["macs_per_image_each"] == [img0, img1]
    assert res["macs_per_image"] == pytest.approx((img0 + img1) / 2)
    assert res["mean_macs_per_forward"] == pytest.approx((img0 + img1) / 2 / 3)
    assert res["tflops_per_image"] == pytest.approx(2 * (img0 + img1) / 2 / 1e12)
    assert res["mean_kept"] == pytest.approx(36 / 6)
    assert sum(res["components"].values()) == pytest.approx(res["macs_per_image"])
    assert res["components"]["blocks.adaLN"] == pytest.approx(3 * 6 * 32 * 32)


def test_sampling_flops_lite_cfg_adds_the_unconditional_half():
    kept = [[5, 7], [6, 6], [4, 8]]
    uncond = [[1, 2], [1, 1], [2, 3]]  # Lite-CFG: the uncond half keeps fewer tokens
    res = sampling_flops(TINY_DC, _trace(kept, uncond), cfg_guidance=True)
    img0 = 6 * A + B * (5 + 6 + 4 + 1 + 1 + 2) + Q * (25 + 36 + 16 + 1 + 1 + 4)
    img1 = 6 * A + B * (7 + 6 + 8 + 2 + 1 + 3) + Q * (49 + 36 + 64 + 4 + 1 + 9)
    assert res["forward_passes_per_image"] == 6
    assert res["macs_per_image_each"] == [img0, img1]
    assert res["tflops_per_image"] == pytest.approx(2 * res["macs_per_image"] / 1e12)
    assert res["mean_uncond_kept"] == pytest.approx(10 / 6)
    assert sampling_flops(TINY_DC, _trace(kept, uncond))["macs_per_image_each"] == [img0, img1]  # inferred CFG
    with pytest.raises(ValueError):
        sampling_flops(TINY_DC, _trace(kept), cfg_guidance=True)


def test_sampling_flops_dit_is_fixed_count_times_steps():
    trace = _trace([[16, 16]] * 4, [[16, 16]] * 4)
    per_pass = dit_macs(TINY_DIT).total
    assert sampling_flops(TINY_DIT, trace, cfg_guidance=True)["macs_per_image"] == 8 * per_pass
    assert sampling_flops(TINY_DIT, trace, cfg_guidance=False)["macs_per_image"] == 4 * per_pass
    assert sampling_flops(TINY_DIT, trace, cfg_guidance=True)["tflops_per_image"] == pytest.approx(16 * per_pass / 1e12)


# ------------------------------------------------------------------------------------------------
# 5. Isoflop depth and reports.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_name", ["DC-DiT-B/N4", "DC-DiT-XL/N4", "DC-DiT-XL/N16"])
def test_dit_depth_for_flops_is_minimal(target_name):
    target = model_macs(get_preset(target_name)).total
    base = get_preset("DiT-XL/2" if "XL" in target_name else "DiT-B/2")
    depth = dit_depth_for_flops(base, target)
    assert dit_macs(dataclasses.replace(base, depth=depth)).total >= target
    assert depth == 1 or dit_macs(dataclasses.replace(base, depth=depth - 1)).total < target


def test_dit_depth_for_flops_edges():
    base = get_preset("DiT-B/2")
    exact = dit_macs(dataclasses.replace(base, depth=7)).total
    assert dit_depth_for_flops(base, exact) == 7
    assert dit_depth_for_flops(base, exact + 1) == 8
    assert dit_depth_for_flops(base, 1) == 1


def test_tables_and_report():
    table = flops_table(TINY_DC, kept_tokens=5)
    for name in ("encoder", "router", "blocks.mlp", "dechunk.smoothing", "final_layer", "total"):
        assert name in table
    assert f"{383536 / 1e9:.4f}" in table
    report = flops_report(get_preset("DC-DiT-B/N4"), (0.0, 0.25, 0.5))
    assert "M = 256" in report
    for M in ("256.0", "192.0", "128.0"):
        assert M in report
    assert "elastic" not in flops_report(get_preset("DiT-B/2"))


def test_sampling_flops_reads_a_real_lite_cfg_trace(helpers):
    from dcdit.sampling import generate

    cfg = dataclasses.replace(TINY_DC, router="cosine", target_ratio=3.0)
    torch.manual_seed(0)
    model = helpers.randomize_(build_model(cfg)).eval()
    res = generate(model, [1, 2], sampler="ddim", num_sampling_steps=3, cfg_scale=1.5,
                   tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=0.5, num_snapshots=1)
    flops = sampling_flops(cfg, res.trace)  # guidance inferred from the trace
    assert flops["cfg_guidance"] and flops["steps"] == 3 and flops["images"] == 2
    for i in range(2):
        expected = sum(dcdit_macs(cfg, int(e["kept"][i])).total + dcdit_macs(cfg, int(e["uncond_kept"][i])).total
                       for e in res.trace)
        assert flops["macs_per_image_each"][i] == expected
    assert flops["mean_uncond_kept"] <= flops["mean_kept"]


def test_packed_dechunk_is_charged_in_the_form_it_ran(helpers):
    """A batch sparse enough for the window-pairs form (32×32 grid, few kept tokens): the record carries
    each sample's pairs (the kernel's non-zeros, counted here independently from the kept mask) and
    record_macs / sampling_flops charge pairs·(D + 1) for the smoothing; the padded execution of the same
    model has no pairs and is charged its direct form."""
    cfg = DCDiTConfig(input_size=32, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                      encoder_width=16, conv_norm_groups=8, router="random", target_ratio=16.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, record = model(x, torch.full((8,), 500), torch.arange(8))
    assert record.dechunk_pairs is not None
    W, R = 32, 7  # σ = 1: the per-axis cut keeps |Δ| ≤ 7 (exp(−Δ²/2) ≥ exp(−30))
    for b in range(8):
        cells = record.kept_mask[b].nonzero().squeeze(1)
        r, c = cells // W, cells % W
        pairs = int((((r[:, None] - r[None]).abs() <= R) & ((c[:, None] - c[None]).abs() <= R)).sum())
        assert int(record.dechunk_pairs[b]) == pairs
        assert record_macs(cfg, record)[b].components["dechunk.smoothing"] == pairs * (32 + 1)
    from dcdit.sampling import generate

    res = generate(model, [1, 2, 3, 4, 5, 6, 7, 8], sampler="ddim", num_sampling_steps=2, num_snapshots=0)
    flops = sampling_flops(cfg, res.trace)
    for i in range(8):
        assert flops["macs_per_image_each"][i] == sum(
            dcdit_macs(cfg, int(e["kept"][i]), dechunk_pairs=int(e["dechunk_pairs"][i])).total for e in res.trace)
    # guided: the [cond; uncond] record is split in halves, each image charged its own two passes
    res = generate(model, [1, 2, 3, 4], sampler="ddim", num_sampling_steps=2, cfg_scale=2.0, num_snapshots=0)
    flops = sampling_flops(cfg, res.trace)
    for i in range(4):
        assert flops["macs_per_image_each"][i] == sum(
            dcdit_macs(cfg, int(e["kept"][i]), dechunk_pairs=int(e["dechunk_pairs"][i])).total
            + dcdit_macs(cfg, int(e["uncond_kept"][i]), dechunk_pairs=int(e["uncond_dechunk_pairs"][i])).total
            for e in res.trace)
    padded = dataclasses.replace(cfg, execution="padded")
    model_p = build_model(padded).eval()
    model_p.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, rec_p = model_p(x, torch.full((8,), 500), torch.arange(8))
    assert rec_p.dechunk_pairs is None
