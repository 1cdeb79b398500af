"""Exact FLOP accounting for DiT and DC-DiT, counted by hand from the architecture (no tracing).

Convention
----------
We count **multiply-accumulates (MACs) of one forward pass for one sample**:

* every matmul, ``nn.Linear`` and convolution (including the depthwise one): a Linear applied to n
  rows costs ``n · in · out``; a k×k conv producing ``out`` channels on n positions costs
  ``n · out · (in / groups) · k²``;
* attention's two matmuls, QKᵀ and AV: ``2 · M² · D`` for M tokens at width D;
* per-sample Linears on the conditioning vector (timestep MLP, every adaLN linear, the conv blocks'
  ``cond_proj``) count once per sample.

Not counted: norms, activations, softmax, biases, elementwise adds/multiplies, the label-embedding
lookup, sin-cos features, gathers/scatters, sorting, argmin. This is what fvcore counts, which is how
the DiT paper's "Gflops" were computed: they are GMACs. :func:`dit_macs` reproduces the DiT paper's
Table 4 — DiT-XL/2 118.6, DiT-B/2 23.0, DiT-XL/4 29.1 GMACs at 256 px (32×32 latent).

"TFLOPs per image" as the DC-DiT paper reports them = **2 × MACs × sampling steps (× 2 with CFG**,
since the conditional and the unconditional half both run): DiT-XL/2 at 250 steps → 59 TFLOPs/img.

DC-DiT's count depends on M, the number of tokens the inner blocks see. :func:`dcdit_macs` counts one
sample with exactly M real tokens (what a variable-length kernel such as flash-attn varlen computes;
PyTorch's padded path computes every sample of a batch at the batch maximum M_max, which we do not
charge). Its components:

==================  ================================================================================
x_embedder          3×3 conv C → d on L positions: 9·C·d·L
t_embedder          Linear 256 → D, Linear D → D (per sample)
y_embedder          0 (a table lookup)
encoder             per ResBlock (in, mid, out): conv1 9·in·mid·L + cond_proj D·mid + conv2
                    9·mid·out·L + skip in·out·L when in ≠ out; the LayerNorm after it: 0
router              cosine: W_Q, W_K 2·D²·L + depthwise 3×3 9·D·L + the dot q·k̄ D·L;
                    predictability (r = D/4): 1×1 D·r·L + 3×3 predictor 9·r²·L (the masked centre
                    tap is still multiplied) + 3×3 9·r²·L + 1×1 r·L; random: 0
chunk               0 (a gather; positions are an add)
blocks.*            per inner block with M tokens: attention_linear (qkv + proj) 4·D²·M,
                    attention_matmul 2·M²·D, mlp 2·mlp_ratio·D²·M (0 for a block without MLP,
                    ``model.inner_mlp``), adaLN 6·D² (per sample, computed in full by every block)
dechunk.smoothing   packed execution (the default), in the form the batch ran: the window pairs
                    (a sparse kernel over the kept neighbours, numerator and denominator):
                    pairs·(D + 1) (``RoutingRecord.dechunk_pairs``), or the separable blur on the
                    H×W grid, a W×W matmul along the rows and an H×H one along the columns of D + 1
                    channels: L·(H + W)·(D + 1), independent of M (also the charge when only M is
                    known: an upper bound, the pairs form runs only when it is cheaper).
                    Padded execution (the direct form): the pairwise squared distances
                    |a|²+|b|²−2a·b, whose matmul of (M, 2) grid coordinates costs 2·M², plus the
                    M×M weight matrix applied to D channels M²·D
dechunk.plug_back   packed: 0 (an integer nearest-neighbour search); padded: the L×M distances to the
                    kept tokens by the same matmul as above, 2·L·M (argmin: 0)
residual_proj       Linear D → D on L positions: D²·L
decoder             ResBlocks as in the encoder (the first projects D → d, with a 1×1 skip)
final_layer         adaLN D → 2d (per sample) + Linear d → C_out on L positions
==================  ================================================================================

M may be a float (e.g. an average kept count); the result is then a float.

DyDiT (``cfg.dydit``, models/dydit.py): each inner block is charged as executed. With h heads and g
of the H MLP channel groups on and n tokens through the MLP: attention_linear 4·D²·M·h/H,
attention_matmul 2·M²·D·h/H, mlp 2·mlp_ratio·D²·(g/H)·n, adaLN 6·D², and ``blocks.dydit_routers``:
the two width routers 2·D·(H − 1) per sample plus the token router (D·r + r)·M (r = its hidden
width). ``dcdit_macs(cfg, M, dydit_usage=...)`` takes the per-block (h, g, n); without it every gate
is counted on. :func:`record_macs` turns a forward pass's RoutingRecord into per-sample counts.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field

from .config import DCDiTConfig, DiTConfig, ModelConfig
from .models.input_checks import as_grid

#: The DC-DiT paper counts images sampled with 250 DDPM steps.
DEFAULT_SAMPLING_STEPS = 250
#: Width of the sinusoidal timestep features fed to the timestep MLP.
TIMESTEP_FREQ_DIM = 256


@dataclass
class FlopBreakdown:
    """MACs of one forward pass for one sample, per component (name → MACs)."""

    model: str
    components: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # L (DC-DiT) or the number of patches (DiT)
    inner_tokens: float = 0.0  # tokens the transformer blocks see: M (DC-DiT) or the patch count (DiT)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    def grouped(self) -> dict[str, float]:
        """Components with the dotted sub-parts summed (``blocks.mlp`` + ... → ``blocks``)."""
        out: dict[str, float] = {}
        for name, macs in self.components.items():
            key = name.split(".")[0]
            out[key] = out.get(key, 0) + macs
        return out

    def table(self) -> str:
        total = self.total
        width = max(len(n) for n in self.components) + 2
        lines = [f"{'component':<{width}}{'GMACs':>12}{'share':>9}", "-" * (width + 21)]
        for name, macs in self.components.items():
            share = macs / total if total else 0.0
            lines.append(f"{name:<{width}}{macs / 1e9:>12.4f}{share:>8.1%}")
        lines.append("-" * (width + 21))
        lines.append(f"{'total':<{width}}{total / 1e9:>12.4f}{1:>8.1%}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------


def _linear(rows: float, fan_in: int, fan_out: int) -> float:
    return rows * fan_in * fan_out


def _conv(positions: int, c_in: int, c_out: int, kernel: int, groups: int = 1) -> int:
    return positions * c_out * (c_in // groups) * kernel * kernel


def _timestep_embedder(D: int) -> int:
    return _linear(1, TIMESTEP_FREQ_DIM, D) + _linear(1, D, D)


def _dit_blocks(D: int, depth: int, mlp_ratio: float, tokens: float, mlp_blocks: int | None = None) -> dict[str, float]:
    """``depth`` DiT blocks with adaLN-Zero on ``tokens`` tokens of width D, ``mlp_blocks`` of them
    with an MLP (None: all; the others are the release's attention-only ``d`` blocks)."""
    hidden = int(D * mlp_ratio)
    mlp_blocks = depth if mlp_blocks is None else mlp_blocks
    return {
        "blocks.attention_linear": depth * (_linear(tokens, D, 3 * D) + _linear(tokens, D, D)),
        "blocks.attention_matmul": depth * 2 * tokens * tokens * D,  # QKᵀ and AV over all heads
        "blocks.mlp": mlp_blocks * (_linear(tokens, D, hidden) + _linear(tokens, hidden, D)),
        "blocks.adaLN": depth * _linear(1, D, 6 * D),
    }


def dydit_block_macs(cfg: DCDiTConfig, tokens: int | float, heads_on: int, groups_on: int, mlp_tokens: int | float) -> dict[str, float]:
    """MACs of ONE DyDiT-gated inner block for one sample with ``tokens`` real tokens, ``heads_on`` of
    the H heads and ``groups_on`` of the H MLP channel groups active and ``mlp_tokens`` tokens through
    the MLP (the always-on head/group 0 included in the counts)."""
    from .models.dydit import token_router_width

    D, H = cfg.hidden_size, cfg.num_heads
    hidden = int(D * cfg.mlp_ratio)
    if not (1 <= heads_on <= H and 1 <= groups_on <= H):
        raise ValueError(f"heads_on and groups_on must lie in [1, {H}], got {heads_on}, {groups_on}")
    if not 0 <= mlp_tokens <= tokens:
        raise ValueError(f"mlp_tokens must lie in [0, tokens={tokens}], got {mlp_tokens}")
    width = heads_on * (D // H)  # q/k/v channels that run
    units = groups_on * (hidden // H)  # MLP hidden units that run
    r = token_router_width(D, cfg.dydit_token_hidden_ratio)
    return {
        "blocks.attention_linear": _linear(tokens, D, 3 * width) + _linear(tokens, width, D),
        "blocks.attention_matmul": 2 * tokens * tokens * width,
        "blocks.mlp": _linear(mlp_tokens, D, units) + _linear(mlp_tokens, units, D),
        "blocks.adaLN": _linear(1, D, 6 * D),
        "blocks.dydit_routers": 2 * _linear(1, D, H - 1) + _linear(tokens, D, r) + _linear(tokens, r, 1),
    }


def _inner_blocks(cfg: DCDiTConfig, M: int | float, dydit_usage=None) -> dict[str, float]:
    """The inner blocks of a DC-DiT on M tokens; DyDiT blocks per ``dydit_usage`` (all on if None)."""
    if not getattr(cfg, "dydit", False):
        if dydit_usage is not None:
            raise ValueError("dydit_usage given for a model without DyDiT gates (model.dydit is false)")
        mlp_blocks = None if getattr(cfg, "inner_mlp", None) is None else sum(cfg.inner_mlp)
        return _dit_blocks(cfg.hidden_size, cfg.depth, cfg.mlp_ratio, M, mlp_blocks)
    H = cfg.num_heads
    usage = [(H, H, M)] * cfg.depth if dydit_usage is None else list(dydit_usage)
    if len(usage) != cfg.depth:
        raise ValueError(f"dydit_usage has {len(usage)} blocks, the model has depth {cfg.depth}")
    total: dict[str, float] = {}
    for heads_on, groups_on, mlp_tokens in usage:
        for name, macs in dydit_block_macs(cfg, M, heads_on, groups_on, mlp_tokens).items():
            total[name] = total.get(name, 0) + macs
    return total


def _dechunk(execution: str, H: int, W: int, D: int, M: int | float, pairs: int | None = None) -> dict[str, float]:
    """The de-chunk as each execution computes it (models/dechunking.py): window pairs or grid blur
    (packed), direct form (padded)."""
    if execution == "packed" and pairs is not None:
        return {"dechunk.smoothing": pairs * (D + 1), "dechunk.plug_back": 0}
    if execution == "packed":
        return {"dechunk.smoothing": H * W * (H + W) * (D + 1), "dechunk.plug_back": 0}
    return {"dechunk.smoothing": 2 * M * M + M * M * D, "dechunk.plug_back": 2 * H * W * M}


def _res_block(L: int, c_in: int, mid: int, c_out: int, cond: int) -> int:
    macs = _conv(L, c_in, mid, 3) + _linear(1, cond, mid) + _conv(L, mid, c_out, 3)
    if c_in != c_out:
        macs += _conv(L, c_in, c_out, 1)
    return macs


def _router(kind: str, D: int, L: int) -> int:
    if kind == "cosine":
        return 2 * _linear(L, D, D) + _conv(L, D, D, 3, groups=D) + L * D
    if kind == "predictability":
        r = D // 4
        return _conv(L, D, r, 1) + _conv(L, r, r, 3) + _conv(L, r, r, 3) + _conv(L, r, 1, 1)
    if kind == "random":
        return 0
    raise ValueError(f"unknown router {kind!r}")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def dit_macs(cfg: DiTConfig) -> FlopBreakdown:
    """MACs of one DiT forward pass for one sample."""
    H, W = as_grid(cfg.input_size)
    P, C, D = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    T = (H // P) * (W // P)
    c_out = 2 * C if cfg.learn_sigma else C
    comps: dict[str, float] = {
        "x_embedder": _conv(T, C, D, P),  # P×P conv with stride P: one output per patch
        "t_embedder": _timestep_embedder(D),
        "y_embedder": 0,
        **_dit_blocks(D, cfg.depth, cfg.mlp_ratio, T),
        "final_layer": _linear(1, D, 2 * D) + _linear(T, D, P * P * c_out),
    }
    return FlopBreakdown(f"DiT (D={D}, depth={cfg.depth}, P={P}, {H}x{W})", comps, T, T)


def dcdit_macs(cfg: DCDiTConfig, kept_tokens: int | float, dydit_usage=None, dechunk_pairs: int | None = None) -> FlopBreakdown:
    """MACs of one DC-DiT forward pass for one sample whose inner sequence has ``kept_tokens`` (M).

    DyDiT models (``cfg.dydit``): ``dydit_usage`` is one (heads on, groups on, tokens through the MLP)
    per inner block (``models.dydit.dydit_usage`` gives it per sample); None counts every gate on.
    ``dechunk_pairs``: the window pairs the packed de-chunk smoothed over when it ran the pairs form
    (``RoutingRecord.dechunk_pairs``); None charges the grid blur, which the pairs form only replaces
    when it is cheaper (``models.dechunking.prefer_pairs``): an upper bound."""
    H, W = as_grid(cfg.input_size)
    L, C, D = H * W, cfg.in_channels, cfg.hidden_size
    d = cfg.encoder_width or D // 4
    M = kept_tokens
    if not 0 < M <= L:
        raise ValueError(f"kept_tokens must lie in (0, L={L}], got {M}")
    c_out = 2 * C if cfg.learn_sigma else C
    enc = [(d, d, d)] * (cfg.encoder_blocks - 1) + [(d, d, D)]
    dec = [(D, d, d)] + [(d, d, d)] * (cfg.decoder_blocks - 1)
    comps: dict[str, float] = {
        "x_embedder": _conv(L, C, d, 3),
        "t_embedder": _timestep_embedder(D),
        "y_embedder": 0,
        "encoder": sum(_res_block(L, i, m, o, D) for i, m, o in enc),
        "router": _router(cfg.router, D, L),
        "chunk": 0,
        **_inner_blocks(cfg, M, dydit_usage),
        **_dechunk(getattr(cfg, "execution", "packed"), H, W, D, M, dechunk_pairs),
        "residual_proj": _linear(L, D, D),
        "decoder": sum(_res_block(L, i, m, o, D) for i, m, o in dec),
        "final_layer": _linear(1, D, 2 * d) + _linear(L, d, c_out),
    }
    dy = ", DyDiT" if getattr(cfg, "dydit", False) else ""
    return FlopBreakdown(f"DC-DiT (D={D}, d={d}, depth={cfg.depth}, {H}x{W}, router={cfg.router}{dy})", comps, L, M)


def record_macs(cfg: DCDiTConfig, record) -> list[FlopBreakdown]:
    """Per-sample MACs of the forward pass that produced ``record`` (a RoutingRecord): each sample at
    its own kept count and, with DyDiT, the heads / groups / MLP tokens its blocks actually ran."""
    B = len(record.kept_count)
    pairs = [None] * B if record.dechunk_pairs is None else record.dechunk_pairs.tolist()
    if getattr(record, "dydit", None) is None:
        return [dcdit_macs(cfg, int(m), dechunk_pairs=n) for m, n in zip(record.kept_count.tolist(), pairs)]
    from .models.dydit import dydit_usage

    # M_b = the slots the blocks treated as real: the kept count (with mask_padding=False and padding
    # in the batch, every slot: the padding then runs as ordinary tokens)
    return [dcdit_macs(cfg, int(m), u, n) for m, u, n in zip(record.dydit.tokens.tolist(), dydit_usage(record), pairs)]


def nominal_kept_tokens(cfg: DCDiTConfig) -> float:
    """The nominal budget M = L / N (N = ``target_ratio``); the trained router lands near, not at, it."""
    H, W = as_grid(cfg.input_size)
    return H * W / cfg.target_ratio


def model_macs(cfg: ModelConfig, kept_tokens: int | float | None = None) -> FlopBreakdown:
    """:func:`dit_macs` or :func:`dcdit_macs`; a DC-DiT without ``kept_tokens`` is counted at the
    nominal budget M = L / target_ratio."""
    if cfg.arch == "dit":
        if kept_tokens is not None:
            raise ValueError("a DiT processes a fixed number of patches; kept_tokens applies to DC-DiT only")
        return dit_macs(cfg)
    if cfg.arch == "dcdit":
        if kept_tokens is None:
            M = nominal_kept_tokens(cfg)
            kept_tokens = int(M) if M.is_integer() else M
        return dcdit_macs(cfg, kept_tokens)
    raise ValueError(f"unknown arch {cfg.arch!r}")


# ------------------------------------------------------------------------------------------------
# Sampling runs
# ------------------------------------------------------------------------------------------------


def _counts(value) -> list[int]:
    """A trace entry's kept counts ((B,) tensor, list or int) as a list of ints."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def sampling_flops(cfg: ModelConfig, result_trace: list[dict], cfg_guidance: bool | None = None) -> dict:
    """Per-image compute of a sampling run from its trace (``SampleResult.trace``).

    DC-DiT: every step charges each image ``dcdit_macs(cfg, kept)`` for its conditional forward and,
    with guidance, ``dcdit_macs(cfg, uncond_kept)`` for its own unconditional forward (Lite-CFG makes
    the two differ). DiT: the fixed count × steps (× 2 with guidance). ``cfg_guidance=None`` infers
    guidance from the trace (``uncond_kept`` present). DyDiT: a trace entry may carry ``dydit`` (and
    ``uncond_dydit``), per image the per-block (heads on, groups on, MLP tokens) of that forward
    (``models.dydit.dydit_usage`` of the half's record); each image is then charged as executed.

    Returns a dict with ``images``, ``steps``, ``forward_passes_per_image``, ``macs_per_image`` (mean
    over the images), ``macs_per_image_each`` (list), ``mean_macs_per_forward``, ``tflops_per_image``
    (= 2 × macs_per_image / 1e12), ``mean_kept`` / ``mean_uncond_kept`` (DC-DiT) and
    ``components`` (per-image MACs per component, mean over the images).
    """
    if not result_trace:
        raise ValueError("empty trace: nothing was sampled")
    if cfg_guidance is None:
        cfg_guidance = "uncond_kept" in result_trace[0]
    steps = len(result_trace)
    passes = steps * (2 if cfg_guidance else 1)
    out: dict = {"steps": steps, "cfg_guidance": cfg_guidance, "forward_passes_per_image": passes}

    if cfg.arch == "dit":
        per_pass = dit_macs(cfg)
        images = len(_counts(result_trace[0]["kept"])) if "kept" in result_trace[0] else 1
        per_image = per_pass.total * passes
        out.update(images=images, macs_per_image=per_image, macs_per_image_each=[per_image] * images,
                   components={k: v * passes for k, v in per_pass.components.items()})
    elif cfg.arch == "dcdit":
        images = len(_counts(result_trace[0]["kept"]))
        per_image = [Counter() for _ in range(images)]  # image -> Counter(kept count -> forward passes)
        kept_sum = uncond_sum = 0
        for k, entry in enumerate(result_trace):
            halves = [("kept", entry.get("kept"))]
            if cfg_guidance:
                if "uncond_kept" not in entry:
                    raise ValueError(f"cfg_guidance=True but trace step {k} has no 'uncond_kept'")
                halves.append(("uncond_kept", entry["uncond_kept"]))
            for key, value in halves:
                counts = _counts(value)
                if len(counts) != images:
                    raise ValueError(f"trace step {k}: {key} has {len(counts)} entries, expected {images}")
                usage = entry.get("dydit" if key == "kept" else "uncond_dydit")  # DyDiT: per image, per block
                pairs = entry.get("dechunk_pairs" if key == "kept" else "uncond_dechunk_pairs")  # packed pairs form
                for i, m in enumerate(counts):
                    u = None if usage is None else tuple(map(tuple, usage[i]))
                    per_image[i][(m, u, None if pairs is None else int(pairs[i]))] += 1
                if key == "kept":
                    kept_sum += sum(counts)
                else:
                    uncond_sum += sum(counts)
        cache: dict = {}

        def breakdown(m) -> FlopBreakdown:  # m: (kept count, DyDiT usage or None, de-chunk pairs or None)
            if m not in cache:
                cache[m] = dcdit_macs(cfg, *m)
            return cache[m]

        each = [sum(breakdown(m).total * n for m, n in hist.items()) for hist in per_image]
        components: dict[str, float] = {}
        for hist in per_image:
            for m, n in hist.items():
                for name, macs in breakdown(m).components.items():
                    components[name] = components.get(name, 0) + macs * n / images
        out.update(images=images, macs_per_image=sum(each) / images, macs_per_image_each=each,
                   components=components, mean_kept=kept_sum / (steps * images))
        if cfg_guidance:
            out["mean_uncond_kept"] = uncond_sum / (steps * images)
    else:
        raise ValueError(f"unknown arch {cfg.arch!r}")
    out["mean_macs_per_forward"] = out["macs_per_image"] / passes
    out["tflops_per_image"] = 2 * out["macs_per_image"] / 1e12
    return out


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def tflops_per_image(macs_per_forward: float, steps: int = DEFAULT_SAMPLING_STEPS, cfg_guidance: bool = False) -> float:
    """The DC-DiT paper's unit: 2 × MACs × steps (× 2 with CFG), in TFLOPs."""
    return 2 * macs_per_forward * steps * (2 if cfg_guidance else 1) / 1e12


def flops_table(cfg: ModelConfig, kept_tokens: int | float | None = None) -> str:
    """Components, GMACs and share of one forward pass, with the per-image TFLOPs at 250 steps."""
    b = model_macs(cfg, kept_tokens)
    if cfg.arch == "dcdit":
        note = " (nominal budget L/N)" if kept_tokens is None else ""
        head = f"{b.model}: L = {b.tokens}, M = {b.inner_tokens:g}{note}"
    else:
        head = f"{b.model}: {b.tokens} patches"
    steps = DEFAULT_SAMPLING_STEPS
    foot = (f"per forward pass: {b.total / 1e9:.3f} GMACs; per image at {steps} steps: "
            f"{tflops_per_image(b.total, steps):.2f} TFLOPs, {tflops_per_image(b.total, steps, True):.2f} with CFG")
    return "\n".join([head, b.table(), foot])


def flops_report(cfg: ModelConfig, tail_drop_fractions: tuple[float, ...] = (0.0, 0.25, 0.5)) -> str:
    """The table at the nominal budget and, for DC-DiT, one row per tail-drop fraction f with
    M = L/N · (1 − f) (the elastic range)."""
    parts = [flops_table(cfg)]
    if cfg.arch == "dcdit":
        M0 = nominal_kept_tokens(cfg)
        steps = DEFAULT_SAMPLING_STEPS
        rows = [f"{'f':>6}{'M':>10}{'GMACs/pass':>13}{'TFLOPs/img':>13}{'with CFG':>11}"]
        for f in tail_drop_fractions:
            M = max(M0 * (1 - f), 1.0)
            macs = dcdit_macs(cfg, M).total
            rows.append(f"{f:>6.2f}{M:>10.1f}{macs / 1e9:>13.3f}{tflops_per_image(macs, steps):>13.2f}"
                        f"{tflops_per_image(macs, steps, True):>11.2f}")
        parts += ["", f"elastic inference (tail-drop fraction f, M = L/N·(1 − f), {steps} steps):", *rows]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Isoflop baselines
# ------------------------------------------------------------------------------------------------


def dit_depth_for_flops(dit_cfg: DiTConfig, target_macs: float) -> int:
    """The smallest depth (≥ 1) whose DiT MACs per forward pass reach ``target_macs``."""
    base = dit_macs(dataclasses.replace(dit_cfg, depth=0)).total
    per_block = dit_macs(dataclasses.replace(dit_cfg, depth=1)).total - base
    depth = max(1, math.ceil((target_macs - base) / per_block))
    # Guard the float division at the boundary with the exact integer counts.
    while depth > 1 and dit_macs(dataclasses.replace(dit_cfg, depth=depth - 1)).total >= target_macs:
        depth -= 1
    while dit_macs(dataclasses.replace(dit_cfg, depth=depth)).total < target_macs:
        depth += 1
    return depth
