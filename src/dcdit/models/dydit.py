"""DyDiT gates for DC-DiT's inner blocks (Zhao et al., arXiv 2410.03456; DC-DiT paper §4.5).

Two kinds of gate are added to every inner DiT block (:class:`DynamicDiTBlock`); nothing else in the
model is gated (encoder, router, de-chunk and decoder always run in full):

* **Timestep-wise dynamic width (TDW).** Two linear routers read the timestep embedding ``t_emb``
  (the output of ``t_embedder``, *before* the class embedding is added, so the masks depend on t
  only) and switch attention heads and MLP channel groups on or off. The MLP's hidden units are split
  into H equal groups (H = number of heads). Each router outputs H − 1 logits; a constant 1 is put in
  front, so head 0 and group 0 are always on.
* **Spatial-wise dynamic token (SDT).** A per-token router Linear(D → D·ratio) → ReLU → Linear(· → 1)
  reads the residual stream right after the attention residual add and decides which tokens run the
  MLP sub-layer. A skipped token passes through unchanged. Attention always sees every token.

Decisions use a Gumbel-sigmoid (:func:`gumbel_sigmoid`): in training, logistic noise, a hard 0/1
decision in the forward pass and the gradient of the soft value (temperature τ) in the backward pass
(straight-through estimator); in eval, the same rule without noise.

Execution
---------
* **Training (and eval with** ``block.sliced_inference = False`` **):** masking. Every head, group and
  token is computed; head outputs, fc1 group outputs and per-token MLP updates are multiplied by the
  masks. Simple and differentiable; saves nothing.
* **Inference (eval, default):** real skipping. The width masks depend on t only, and at one sampling
  step the whole batch shares t, so there is one static sub-network per call: attention runs with the
  active heads' q/k/v rows and ``proj`` input columns gathered out of the weights, the MLP with the
  active groups' fc1 rows and fc2 columns. If a batch mixes timesteps, the samples are grouped by mask
  pattern and each group runs its own sub-network (exact, just less batched). The MLP runs only on the
  tokens that keep it: real tokens with mask 1 are flattened over the batch to one compact (N, D)
  tensor, normed, modulated with their own sample's shift/scale, pushed through the (sliced) MLP and
  added back with their sample's gate. Padding slots (``kv_mask`` False) never run the MLP and never
  count as kept tokens.

Initialisation: router weights start at zero (the first token-router layer Xavier) and the biases at
+15 (width routers) and +35 (token router), as in the DyDiT release. With zero weights the logits
are exactly the biases for any input, so every head, group and token is on — a freshly gated block
computes exactly what the ungated block computes (and, with noise, a gate is off with probability
sigmoid(−15) ≈ 3·10⁻⁷). The release uses Xavier weights for the width routers as well; zero weights
make "everything on at step 0" independent of the magnitude of a trained checkpoint's t_emb, and
the routers still get gradients (∂logit/∂W = t_emb ≠ 0).

What a forward pass decided is returned per call, never cached on the module: the blocks append a
:class:`DyDiTBlockStats` to a list, and DCDiT stores the stacked :class:`DyDiTRecord` in
``RoutingRecord.dydit``. :func:`dydit_flops_loss` and :func:`flops_target` are the training objective;
``dcdit.flops.record_macs`` / ``dcdit.flops.dcdit_macs(..., dydit_usage=...)`` count MACs as executed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit_block import DiTBlock, Layout
from .packing import as_layout

#: Initial router biases of the DyDiT release: every head/group (+15) and token (+35) starts on.
WIDTH_BIAS_INIT = 15.0
TOKEN_BIAS_INIT = 35.0
#: The DyDiT release keeps the FLOPs target at 1.0 for this many steps before using the schedule.
FLOPS_TARGET_HOLD_STEPS = 100


# ------------------------------------------------------------------------------------------------
# Gumbel-sigmoid with a straight-through estimator
# ------------------------------------------------------------------------------------------------


def gumbel_sigmoid(
    logits: torch.Tensor, tau: float = 5.0, threshold: float = 0.5, training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """0/1 gates (float, same shape as ``logits``) from router logits.

    Training: z = logits + logistic noise (the difference of two Gumbel(0, 1) samples, drawn here as
    log u − log(1 − u)); soft = sigmoid(z / τ); hard = 1[soft > threshold]. The forward value is
    exactly ``hard``; the gradient is that of ``soft`` (straight-through). With threshold 0.5 a gate
    is on with probability sigmoid(logit), and τ only scales the gradient.
    Eval: the same rule without noise, hard = 1[sigmoid(logits / τ) > threshold] (at threshold 0.5:
    logit > 0, i.e. sigmoid(logit) > 0.5, as the release does); no gradient.
    """
    logits = logits.float()
    if not training:
        return (torch.sigmoid(logits / tau) > threshold).float()
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > threshold).float()
    return hard + (soft - soft.detach())  # exactly `hard` forward, d soft backward


# ------------------------------------------------------------------------------------------------
# Per-call records
# ------------------------------------------------------------------------------------------------


@dataclass
class DyDiTBlockStats:
    """What one dynamic block did in one call (B samples, H heads, M slots).

    head_mask:  (B, H) float, 1 = attention head ran (index 0 always 1).
    group_mask: (B, H) float, 1 = MLP channel group ran (index 0 always 1).
    token_mask: (B, M) float, 1 = the token ran the MLP; always 0 on padding slots.
    In training the masks carry the straight-through gradient.
    """

    head_mask: torch.Tensor
    group_mask: torch.Tensor
    token_mask: torch.Tensor


@dataclass
class DyDiTRecord:
    """The gates of all inner blocks for one batch (``RoutingRecord.dydit``). Stacked over blocks:

    head_mask:  (depth, B, H) float;  group_mask: (depth, B, H) float;
    token_mask: (depth, B, M) float (0 on padding);
    real_mask:  (B, M) bool, the slots the blocks treated as real tokens (``kv_mask``; every slot when
                the batch has no padding or ``mask_padding`` is off).
    """

    head_mask: torch.Tensor
    group_mask: torch.Tensor
    token_mask: torch.Tensor
    real_mask: torch.Tensor

    @staticmethod
    def from_blocks(stats: list[DyDiTBlockStats], real_mask: torch.Tensor, packing=None) -> "DyDiTRecord":
        """Stack the blocks' stats. With ``packing`` (a ``models.packing.Packing``) the token masks are
        packed (T,) and are laid out in the (B, M) slots of ``real_mask`` (differentiably)."""
        tokens = [s.token_mask for s in stats]
        if packing is not None:
            tokens = [packing.to_padded(t, real_mask.shape[1]) for t in tokens]
        return DyDiTRecord(
            torch.stack([s.head_mask for s in stats]), torch.stack([s.group_mask for s in stats]),
            torch.stack(tokens), real_mask,
        )

    @property
    def depth(self) -> int:
        return self.head_mask.shape[0]

    @property
    def tokens(self) -> torch.Tensor:
        """(B,) long: real tokens per sample (M_b)."""
        return self.real_mask.sum(1)

    @property
    def heads_on(self) -> torch.Tensor:
        """(depth, B) float: heads that ran, per block and sample."""
        return self.head_mask.sum(-1)

    @property
    def groups_on(self) -> torch.Tensor:
        """(depth, B) float: MLP channel groups that ran."""
        return self.group_mask.sum(-1)

    @property
    def mlp_tokens(self) -> torch.Tensor:
        """(depth, B) float: real tokens that ran the MLP."""
        return self.token_mask.sum(-1)

    def summary(self) -> dict[str, float]:
        """Batch means: fraction of heads on, of groups on, of real tokens through the MLP."""
        H = self.head_mask.shape[-1]
        tokens = self.tokens.clamp_min(1).float()
        return {
            "heads_on": float(self.heads_on.detach().mean() / H),
            "groups_on": float(self.groups_on.detach().mean() / H),
            "tokens_on": float((self.mlp_tokens.detach() / tokens).mean()),
        }

    @staticmethod
    def cat(records: list["DyDiTRecord"]) -> "DyDiTRecord":
        """Concatenate along the batch; narrower token masks are padded with non-real slots."""
        M = max(r.real_mask.shape[1] for r in records)
        return DyDiTRecord(
            torch.cat([r.head_mask for r in records], 1), torch.cat([r.group_mask for r in records], 1),
            torch.cat([F.pad(r.token_mask, (0, M - r.token_mask.shape[-1])) for r in records], 1),
            torch.cat([F.pad(r.real_mask, (0, M - r.real_mask.shape[-1])) for r in records], 0),
        )

    def split(self, sections: int) -> list["DyDiTRecord"]:
        """Split along the batch exactly as ``torch.chunk`` (``RoutingRecord.split``) does."""
        parts = zip(self.head_mask.chunk(sections, 1), self.group_mask.chunk(sections, 1),
                    self.token_mask.chunk(sections, 1), self.real_mask.chunk(sections, 0))
        return [DyDiTRecord(*p) for p in parts]


def _as_dydit(record) -> DyDiTRecord:
    rec = record if isinstance(record, DyDiTRecord) else getattr(record, "dydit", None)
    if rec is None:
        raise ValueError("no DyDiT record: build the model with model.dydit=true (RoutingRecord.dydit is None)")
    return rec


def dydit_usage(record) -> list[tuple[tuple[int, int, int], ...]]:
    """Per sample, per block: (heads on, groups on, tokens through the MLP) as ints — the form
    ``dcdit.flops.dcdit_macs(cfg, kept, dydit_usage=...)`` and ``sampling_flops`` trace entries take.
    ``record`` is a RoutingRecord (with ``.dydit``) or a :class:`DyDiTRecord`."""
    rec = _as_dydit(record)
    stacked = torch.stack([rec.heads_on, rec.groups_on, rec.mlp_tokens], -1).detach().round().long()  # (depth, B, 3)
    return [tuple(tuple(block) for block in sample) for sample in stacked.transpose(0, 1).tolist()]


# ------------------------------------------------------------------------------------------------
# FLOPs-target loss
# ------------------------------------------------------------------------------------------------


def dydit_flops_ratio(record, cfg) -> torch.Tensor:
    """(B,) F_dyn,b / F_static,b over the INNER BLOCKS ONLY, differentiable through the STE masks.

    ``cfg`` is the DCDiTConfig (or anything with ``hidden_size``, ``num_heads``, ``mlp_ratio``). Per
    sample b with M_b real tokens (its own inner length), per block l, in MACs:

        F_dyn,b  = Σ_l (h_bl/H)·(4·D²·M_b + 2·M_b²·D) + (g_bl/H)·n_bl·2·D·hidden
        F_static = depth·(4·D²·M_b + 2·M_b²·D + M_b·2·D·hidden)

    h_bl / g_bl: heads / MLP groups on (the always-on index 0 included), n_bl: real tokens that ran
    the MLP, hidden = int(D·mlp_ratio) (= mlp_ratio·D). adaLN, the DyDiT routers, encoder, DC-DiT router, de-chunk
    and decoder costs are not in either term.
    """
    rec = _as_dydit(record)
    D, H = cfg.hidden_size, cfg.num_heads
    hidden = int(D * cfg.mlp_ratio)
    with torch.autocast(device_type=rec.head_mask.device.type, enabled=False):
        M = rec.tokens.float()  # (B,)
        attn = 4.0 * D * D * M + 2.0 * M * M * D  # (B,) full attention of one block
        per_token = 2.0 * D * hidden  # full MLP per token
        dyn = (rec.head_mask.float().sum(-1) / H * attn + rec.group_mask.float().sum(-1) / H
               * rec.token_mask.float().sum(-1) * per_token).sum(0)  # (B,)
        static = rec.depth * (attn + M * per_token)
        return dyn / static


def dydit_flops_loss(record, cfg, target: float) -> torch.Tensor:
    """DyDiT's FLOPs-constrained loss (mean_b F_dyn,b / F_static,b − λ)², a scalar.

    λ = ``target`` is the wanted ratio of the **inner DiT blocks'** MACs (attention + MLP of the
    blocks between chunking and de-chunking) to their ungated MACs — NOT of the whole DC-DiT: the
    encoder, router, de-chunk and decoder are not gated and are excluded (as DyDiT excludes
    embedders, adaLN and the final layer). Each sample is measured against its own kept length M_b
    (see :func:`dydit_flops_ratio`). ``record``: the RoutingRecord the model returned (or its
    ``.dydit``); ``cfg``: the DCDiTConfig. Unweighted: the trainer adds ``weight · loss`` (the
    DyDiT release uses weight 2, the paper writes 1).
    """
    return (dydit_flops_ratio(record, cfg).mean() - target) ** 2


def flops_target(step: int, warmup_steps: int, lam: float, hold_steps: int = FLOPS_TARGET_HOLD_STEPS) -> float:
    """The DyDiT release's target schedule: 1.0 while ``step < hold_steps`` (100); otherwise a linear
    ramp 1 − (1 − λ)·step / warmup_steps that reaches λ at ``step = warmup_steps`` (the ramp is
    measured from step 0, so the first 100 steps are simply held at 1.0), and λ after that.
    ``warmup_steps = 0``: λ from step ``hold_steps`` on. ``step`` counts fine-tuning steps from 0."""
    if step < hold_steps:
        return 1.0
    if warmup_steps > 0 and step <= warmup_steps:
        return 1.0 - (1.0 - lam) * step / warmup_steps
    return float(lam)


# ------------------------------------------------------------------------------------------------
# The dynamic block
# ------------------------------------------------------------------------------------------------


def _pattern_groups(mask: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """mask (B, K) bool -> [(sample indices or None for all, active indices)], one per distinct row."""
    if bool((mask == mask[:1]).all()):
        return [(None, mask[0].nonzero().squeeze(1))]
    patterns, inverse = torch.unique(mask, dim=0, return_inverse=True)
    return [((inverse == i).nonzero().squeeze(1), patterns[i].nonzero().squeeze(1)) for i in range(len(patterns))]


class DynamicDiTBlock(DiTBlock):
    """A :class:`DiTBlock` with DyDiT's width and token gates. The DiTBlock parameters keep their names
    (a DC-DiT / DiT state dict loads with ``strict=False``, missing only the ``*_router`` keys).

    ``forward(x, c, layout, t_emb, stats)`` -> the shape of x: x (B, M, D) tokens or packed (T, D),
    c (B, D) conditioning (t + y, for adaLN), layout the tokens' layout as for :class:`DiTBlock` (None,
    a (B, M) bool key mask, or a ``Packing``), t_emb (B, D) the timestep embedding alone (the width
    routers' input), stats: a list the block appends its :class:`DyDiTBlockStats` to (token masks
    (B, M) padded or (T,) packed).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, token_hidden_ratio: float = 1 / 16,
        tau: float = 5.0, threshold: float = 0.5,
    ):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        hidden = self.mlp.fc1.out_features
        if hidden % num_heads:
            raise ValueError(f"MLP width {hidden} is not divisible into {num_heads} channel groups")
        if not 0 < threshold < 1 or tau <= 0:
            raise ValueError(f"need 0 < dydit_threshold < 1 and dydit_tau > 0, got {threshold}, {tau}")
        self.num_heads = num_heads
        self.tau = tau
        self.threshold = threshold
        self.attn_router = nn.Linear(hidden_size, num_heads - 1)  # heads 1..H-1 (head 0 always on)
        self.mlp_router = nn.Linear(hidden_size, num_heads - 1)  # MLP groups 1..H-1
        r = token_router_width(hidden_size, token_hidden_ratio)
        self.token_router = nn.Sequential(nn.Linear(hidden_size, r), nn.ReLU(), nn.Linear(r, 1))
        #: eval only: True = run sliced sub-networks and gathered tokens (real savings); False = masking.
        self.sliced_inference = True
        self.reset_router_parameters()

    def reset_router_parameters(self) -> None:
        """Everything on at init (see the module docstring): zero weights, biases +15 / +35."""
        for router in (self.attn_router, self.mlp_router):
            nn.init.zeros_(router.weight)
            nn.init.constant_(router.bias, WIDTH_BIAS_INIT)
        nn.init.xavier_uniform_(self.token_router[0].weight)
        nn.init.zeros_(self.token_router[0].bias)
        nn.init.zeros_(self.token_router[2].weight)
        nn.init.constant_(self.token_router[2].bias, TOKEN_BIAS_INIT)

    # --- gates -----------------------------------------------------------------------------------

    def _gate(self, logits: torch.Tensor) -> torch.Tensor:
        return gumbel_sigmoid(logits, self.tau, self.threshold, self.training)

    def width_masks(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t_emb (B, D) -> head mask, group mask, each (B, H) float with column 0 fixed to 1."""
        with torch.autocast(device_type=t_emb.device.type, enabled=False):
            t = t_emb.float()
            out = []
            for router in (self.attn_router, self.mlp_router):
                m = self._gate(F.linear(t, router.weight.float(), router.bias.float()))
                out.append(torch.cat([m.new_ones(m.shape[0], 1), m], dim=1))
        return out[0], out[1]

    def token_mask(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x (B, M, D) or (T, D) residual stream after attention, real (B, M) or (T,) bool -> float mask
        of the same shape, 0 on padding."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            r = self.token_router
            h = F.relu(F.linear(x.float(), r[0].weight.float(), r[0].bias.float()))
            logits = F.linear(h, r[2].weight.float(), r[2].bias.float()).squeeze(-1)
            return self._gate(logits) * real.float()

    # --- forward ---------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, layout: Layout = None,
        t_emb: torch.Tensor | None = None, stats: list | None = None,
    ) -> torch.Tensor:
        if t_emb is None:
            raise ValueError("DynamicDiTBlock routes on the timestep embedding: pass t_emb (B, D)")
        layout = as_layout(layout)
        # 6 × (B, 1, D) or (T, D); expanded chunk by chunk: contiguous operands make the elementwise
        # ops and the backward's segment sums ~1.7× faster than chunks of one (T, 6D) tensor (measured)
        mods = [layout.per_token(v) for v in self.adaLN_modulation(c).chunk(6, dim=1)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        head_mask, group_mask = self.width_masks(t_emb)
        sliced = self.sliced_inference and not self.training

        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        a = self._attention_sliced(h, layout, head_mask) if sliced else self._attention_masked(h, layout, head_mask)
        x = x + gate_msa * a

        tok = self.token_mask(x, layout.real(x))
        if sliced:
            x = self._mlp_sliced(x, layout, shift_mlp, scale_mlp, gate_mlp, group_mask, tok)
        else:
            m = self._mlp_masked(self.norm2(x) * (1 + scale_mlp) + shift_mlp, layout, group_mask)
            x = x + tok.unsqueeze(-1).to(m.dtype) * (gate_mlp * m)
        if stats is not None:
            stats.append(DyDiTBlockStats(head_mask, group_mask, tok))
        return x

    # --- masked execution (training) -------------------------------------------------------------

    def _attention_masked(self, x, layout, head_mask):
        *rows, D = x.shape
        H = self.num_heads
        out = layout.attend(self.attn.qkv(x).reshape(*rows, 3, H, D // H))  # (..., H, hd)
        out = out * layout.per_token(head_mask)[..., None].to(out.dtype)
        return self.attn.proj(out.reshape(*rows, D))

    def _mlp_masked(self, x, layout, group_mask):
        h = self.mlp.fc1(x)  # (..., hidden)
        units = group_mask.repeat_interleave(h.shape[-1] // self.num_heads, dim=1)  # (B, hidden)
        return self.mlp.fc2(self.mlp.act(h * layout.per_token(units).to(h.dtype)))  # GELU(0) = 0

    # --- sliced execution (inference) ------------------------------------------------------------

    def _attention_heads(self, x, layout, active):
        """Attention with only the ``active`` heads: gathered q/k/v rows and proj input columns."""
        *rows, D = x.shape
        H, hd, h = self.num_heads, D // self.num_heads, active.numel()
        qkv_w = self.attn.qkv.weight.view(3, H, hd, D)[:, active].reshape(3 * h * hd, D)
        qkv_b = None if self.attn.qkv.bias is None else self.attn.qkv.bias.view(3, H, hd)[:, active].reshape(-1)
        out = layout.attend(F.linear(x, qkv_w, qkv_b).reshape(*rows, 3, h, hd))
        proj_w = self.attn.proj.weight.view(D, H, hd)[:, active].reshape(D, h * hd)
        return F.linear(out.reshape(*rows, h * hd), proj_w, self.attn.proj.bias)

    def _attention_sliced(self, x, layout, head_mask):
        on = head_mask > 0.5
        if bool(on.all()):
            return self.attn(x, layout)  # the full sub-network: the plain block
        out = None
        for samples, active in _pattern_groups(on):
            if samples is None:
                return self._attention_heads(x, layout, active)
            rows, sub = layout.select(samples)  # padded: the samples; packed: their tokens' rows
            o = self._attention_heads(x[rows], sub, active)
            if out is None:
                out = o.new_zeros(x.shape[:-1] + o.shape[-1:])
            out[rows] = o
        return out

    def _mlp_sliced(self, x, layout, shift, scale, gate, group_mask, tok):
        sel = tok > 0.5  # (B, M) or (T,) bool, padding already 0
        on = group_mask > 0.5
        if bool(on.all()) and bool(sel.all()):  # every group, every token: the plain block
            return x + gate * self.mlp(self.norm2(x) * (1 + scale) + shift)
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        size = fc1.out_features // self.num_heads
        # per-token views of the per-sample vectors: (B, M, D) broadcast or (T, D) rows
        shift, scale, gate = (v.expand(*x.shape[:-1], v.shape[-1]) for v in (shift, scale, gate))
        for samples, active in _pattern_groups(on):
            s = sel
            if samples is not None:
                in_group = torch.zeros(group_mask.shape[0], 1, dtype=torch.bool, device=x.device)
                in_group[samples] = True
                s = sel & layout.per_token(in_group).squeeze(-1)
            idx = s.nonzero(as_tuple=True)  # (b, m) padded, (t,) packed
            if idx[0].numel() == 0:
                continue
            h = self.norm2(x[idx])  # (N, D): the compact tensor of tokens that run the MLP
            h = h * (1 + scale[idx]) + shift[idx]
            if active.numel() == self.num_heads:
                h = self.mlp(h)
            else:
                units = (active[:, None] * size + torch.arange(size, device=x.device)).reshape(-1)
                h = F.linear(self.mlp.act(F.linear(h, fc1.weight[units], fc1.bias[units])), fc2.weight[:, units], fc2.bias)
            x = x.index_put(idx, (gate[idx] * h).to(x.dtype), accumulate=True)
        return x


def token_router_width(hidden_size: int, ratio: float) -> int:
    """Hidden width of the token router: round(D · ratio), at least 1 (DyDiT: D/16)."""
    return max(1, int(round(hidden_size * ratio)))


def set_dydit_execution(model: nn.Module, sliced: bool) -> None:
    """Eval execution of every :class:`DynamicDiTBlock` in ``model``: sliced (real skipping, default)
    or masked (for checks; training always masks)."""
    for m in model.modules():
        if isinstance(m, DynamicDiTBlock):
            m.sliced_inference = sliced


ROUTER_MODULES = ("attn_router.", "mlp_router.", "token_router.")


def is_dydit_router(name: str) -> bool:
    """True for a parameter name of a DyDiT router (the keys a DC-DiT checkpoint lacks)."""
    return any(k in name for k in ROUTER_MODULES)


def dydit_router_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the DyDiT routers."""
    return [(n, p) for n, p in model.named_parameters() if is_dydit_router(n)]


__all__ = [
    "DynamicDiTBlock", "DyDiTBlockStats", "DyDiTRecord", "gumbel_sigmoid", "dydit_flops_ratio", "dydit_flops_loss",
    "flops_target", "dydit_usage", "set_dydit_execution", "dydit_router_parameters", "is_dydit_router", "token_router_width",
    "WIDTH_BIAS_INIT", "TOKEN_BIAS_INIT",
]
