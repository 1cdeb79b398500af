"""DC-DiT: the Dynamic Chunking Diffusion Transformer (Haridas et al. 2026, arXiv 2603.06351, §3).

Every latent pixel is a token (P = 1). The forward pass is the paper's six steps:

    encode → route → chunk → inner DiT blocks → de-chunk → decode

Shapes: B batch, C channels, (H, W) grid, L = H·W tokens, D width, d = D/4 conv width, M kept tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .chunking import TAIL_DROP_ROUNDINGS, RoutingRecord, gather_tokens, route_and_plan
from .conv_blocks import ConvStage
from .dechunking import DeChunk
from .dit_block import DiTBlock, FinalLayer, inner_mlp_flags
from .dydit import DyDiTRecord, DynamicDiTBlock
from .norms import stack_norm
from .embedders import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed
from .dit import init_conditioning_and_gates, xavier_init_linears
from .hub import HubMixin
from ..diffusion.schedules import check_noise_schedule
from .input_checks import as_grid, check_inputs
from .packing import Packing
from .router import build_router


#: ``model.execution``: packed (the default) or padded (the reference), see :meth:`DCDiT.process_chunks`.
EXECUTIONS = ("packed", "padded")


def straight_through(x: torch.Tensor) -> torch.Tensor:
    """Exactly 1 in the forward pass; passes the gradient to x unchanged (Bengio et al. 2013; H-Net)."""
    return x - x.detach() + 1.0


def check_options(residual_init: str, inner_adaln_init: str, encoder_blocks: int, decoder_blocks: int, dydit: bool,
                  inner_mlp: list[bool], execution: str, tail_drop_rounding: str) -> None:
    """One-line errors for option values the constructor cannot build (``dcdit.config_checks`` refuses
    the same values earlier, naming the config key, for models built from a config)."""
    if residual_init not in ("zero", "xavier"):
        raise ValueError(f"model.residual_init must be 'zero' (H-Net) or 'xavier' (the authors' release), got {residual_init!r}")
    if inner_adaln_init not in ("zero", "xavier"):
        raise ValueError(f"model.inner_adaln_init must be 'zero' (adaLN-Zero) or 'xavier' (the authors' release), got {inner_adaln_init!r}")
    if encoder_blocks < 1 or decoder_blocks < 1:
        raise ValueError("encoder_blocks and decoder_blocks must be at least 1")
    if dydit and not all(inner_mlp):
        raise ValueError("model.inner_mlp has blocks without MLP, which DyDiT cannot gate: set model.dydit false or model.inner_mlp null")
    if execution not in EXECUTIONS:
        raise ValueError(f"model.execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    if tail_drop_rounding not in TAIL_DROP_ROUNDINGS:
        raise ValueError(f"model.tail_drop_rounding must be one of {', '.join(TAIL_DROP_ROUNDINGS)}, got {tail_drop_rounding!r}")


class DCDiT(nn.Module, HubMixin):
    """x (B, C, H, W), t (B,), y (B,) -> (prediction (B, 2C, H, W), RoutingRecord)."""

    def __init__(
        self,
        # DiT's fields (models.dit.DiT takes the same)
        input_size: int | tuple[int, int] = 32, in_channels: int = 4, hidden_size: int = 768, depth: int = 12,
        num_heads: int = 12, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000,
        learn_sigma: bool = True, timestep_freq_shift: float = 0.0, noise_schedule: str = "linear",
        label_embed_std: float = 0.02,
        # 1. and 6. the conv encoder / decoder
        encoder_width: int | None = None, encoder_blocks: int = 2, decoder_blocks: int = 2, conv_norm_groups: int = 32,
        # 2.–5. router, chunking, inner network, de-chunking
        router: str = "cosine", target_ratio: float = 4.0, dechunk_sigma: float = 1.0, residual_init: str = "zero",
        mask_padding: bool = True, execution: str = "packed", inner_mlp: list[bool] | None = None,
        # upcycling (dcdit.upcycle) and DyDiT gates (models/dydit.py)
        cond_adaptor: bool = False, pos_scale: float = 1.0, pos_offset: float = 0.0,
        dydit: bool = False, dydit_token_hidden_ratio: float = 1 / 16, dydit_tau: float = 5.0, dydit_threshold: float = 0.5,
        # the authors' release's choices (config.RELEASE_MODEL_OPTIONS, docs/release.md)
        conv_norm_eps: float = 1e-6, conv_stack_norm: str = "layernorm", inner_stack_norm: str = "none",
        router_centre_tap: bool = False, inner_adaln_init: str = "zero", dechunk_eps: float = 0.0,
        tail_drop_rounding: str = "tolerant",
    ):
        """The modules of paper §3 in the order the forward pass uses them. The arguments are the
        fields of ``DCDiTConfig`` (documented there and in the README's config tables), grouped by step."""
        super().__init__()
        D = hidden_size
        d = encoder_width or D // 4
        inner_mlp = inner_mlp_flags(inner_mlp, depth)
        check_options(residual_init, inner_adaln_init, encoder_blocks, decoder_blocks, dydit, inner_mlp, execution,
                      tail_drop_rounding)
        self.grid = as_grid(input_size)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.noise_schedule = check_noise_schedule(noise_schedule)  # read by training and sampling
        self.label_embed_std = label_embed_std
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.residual_init = residual_init
        self.inner_adaln_init = inner_adaln_init
        self.tail_drop_rounding = tail_drop_rounding
        self.mask_padding = mask_padding
        self.dydit = dydit
        # packed | padded: the layout of the inner network (models/packing.py). Unmasked padding
        # (mask_padding=False, padding slots attended as tokens) only exists in the padded layout.
        self.execution = execution if mask_padding else "padded"

        # Conditioning and the P = 1 embedder (3×3 "same" conv C → d).
        self.x_embedder = PatchEmbed(in_channels, d, kernel_size=3, stride=1, padding=1)
        self.t_embedder = TimestepEmbedder(D, downscale_freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, D, class_dropout_prob)
        # 1. Encoder at d, its last block projecting up to D.
        enc = [(d, d, d)] * (encoder_blocks - 1) + [(d, d, D)]
        self.encoder = ConvStage(enc, D, conv_norm_groups, cond_adaptor, conv_norm_eps, conv_stack_norm)
        # 2. Router.  3. Chunking has no parameters; positions are a fixed 2D sin-cos table.
        self.router = build_router(router, D, target_ratio, centre_tap=router_centre_tap)
        # Token (r, c) sits at ((r − pos_offset)·pos_scale, (c − pos_offset)·pos_scale): the identity by
        # default; an upcycled DiT/P uses the centre of its P×P patch grid (see dcdit.upcycle).
        pos = torch.from_numpy(get_2d_sincos_pos_embed(D, self.grid, pos_scale, pos_offset)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, L, D)
        # 4. Inner network: the DiT blocks of the baseline.
        if dydit:  # DyDiT gates in the inner blocks (paper §4.5, models/dydit.py); DiTBlock names are kept
            self.blocks = nn.ModuleList([DynamicDiTBlock(D, num_heads, mlp_ratio, dydit_token_hidden_ratio, dydit_tau,
                                                         dydit_threshold) for _ in range(depth)])
        else:  # inner_mlp: the release's D (with MLP) and d (attention only) blocks
            self.blocks = nn.ModuleList([DiTBlock(D, num_heads, mlp_ratio, has_mlp) for has_mlp in inner_mlp])
        self.inner_norm = stack_norm(inner_stack_norm, D)  # the release ends the inner stack with an RMSNorm
        # 5. De-chunking, and the residual around the inner network (kept in fp32).
        self.dechunk = DeChunk(dechunk_sigma, eps=dechunk_eps)
        self.residual_proj = nn.Linear(D, D)
        # 6. Decoder at d, its first block projecting D down; DiT's final layer (cond width D).
        dec = [(D, d, d)] + [(d, d, d)] * (decoder_blocks - 1)
        self.decoder = ConvStage(dec, D, conv_norm_groups, cond_adaptor, conv_norm_eps, conv_stack_norm)
        self.final_layer = FinalLayer(d, 1, self.out_channels, cond_size=D)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's scheme (Xavier Linears, zero adaLN gates and output) plus the router's own init
        (identity projections, averaging kernel) and the residual projection: weight zero as in
        H-Net (``residual_init="zero"``, default) or Xavier as the authors' release ends up with.

        ``inner_adaln_init="xavier"`` reproduces how the release really initialises: its adaLN-Zero
        step tests the inner blocks against a class that a double import made distinct, so their
        modulation Linears keep the Xavier init (bias 0) and only the final layer starts at zero
        (docs/release.md)."""
        xavier_init_linears(self)
        init_conditioning_and_gates(self, self.label_embed_std, zero_blocks=self.inner_adaln_init == "zero")
        if hasattr(self.router, "reset_parameters"):
            self.router.reset_parameters()
        for block in self.blocks:
            if isinstance(block, DynamicDiTBlock):
                block.reset_router_parameters()  # all gates on at init
        if self.residual_init == "zero":
            nn.init.constant_(self.residual_proj.weight, 0)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
        tail_dropping_fraction: float | torch.Tensor = 0.0, budget_groups: int = 1,
        force_drop_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingRecord]:
        """``tail_dropping_fraction``: a float or a (B,) tensor (every sample its own budget).
        ``budget_groups = k`` (padded execution only, the reference path as it was before packing):
        steps 3–5 run on k equal slices of the batch, each padded only to its own longest sequence
        (Lite-CFG's halves). Packed execution runs every sample at its own length and ignores it.
        ``force_drop_ids`` (B,): 1 where the label becomes the null class; when given, it replaces
        the random label dropout of training mode (as in DiT's ``LabelEmbedder``)."""
        check_inputs(
            x, t, y, in_channels=self.in_channels, grid=self.grid,
            num_classes=self.num_classes, allow_null=self.class_dropout_prob > 0,
        )
        B = x.shape[0]
        t_emb = self.t_embedder(t)  # (B, D); DyDiT's width routers read it alone
        c = t_emb + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)

        h = self.encoder(self.x_embedder.proj(x), c)  # 1. encode: (B, L, D)
        p, natural = self.router(h, self.grid)  # 2. route: (B, L) each
        fractions = torch.as_tensor(tail_dropping_fraction, dtype=torch.float64, device=x.device).expand(B)
        padded_groups = self.execution == "padded" and budget_groups > 1
        groups = torch.arange(B, device=x.device).chunk(budget_groups) if padded_groups else [slice(None)]
        records, zs = [], []
        for g in groups:
            records.append(route_and_plan(p[g], natural[g], fractions[g], self.grid, self.tail_drop_rounding))
            zs.append(self.process_chunks(h[g], c[g], records[-1], t_emb[g]))  # 3.–5. chunk, inner blocks, de-chunk
        record = RoutingRecord.cat(records) if len(groups) > 1 else records[0]
        z = torch.cat(zs) if len(groups) > 1 else zs[0]  # (B, L, D), fp32
        with torch.autocast(device_type=x.device.type, enabled=False):
            selected_p = torch.where(record.natural_mask, record.p, 1 - record.p)  # (B, L)
            # z·STE(p̂) + (W h + b): one in-place multiply-add onto the Linear's fresh output, fed in 2D so
            # that it is no view (in place on a view, autograd would copy the gradient once more in the
            # backward). The product and the sum were two more (B, L, D) passes and buffers: 0.68× the
            # forward time, 0.89× with backward (ad-hoc interleaved script, 1 thread under load). Bit
            # for bit the previous values: addcmul adds 1·z·s to the same W h + b.
            D = z.shape[-1]
            gate = straight_through(selected_p).reshape(-1, 1)
            z = self.residual_proj(h.float().reshape(-1, D)).addcmul_(z.reshape(-1, D), gate).view(B, -1, D)

        out = self.decoder(z.transpose(1, 2).reshape(B, -1, *self.grid), c)  # 6. decode: (B, L, d)
        out = self.final_layer(out, c)  # (B, L, C_out)
        return out.transpose(1, 2).reshape(B, self.out_channels, *self.grid), record

    def process_chunks(self, h: torch.Tensor, c: torch.Tensor, record: RoutingRecord, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Steps 3–5: gather the kept tokens, run the DiT blocks, de-chunk to (B, L, D) fp32.

        Packed (default): the T = Σ kept_count real tokens in one (T, D) sequence, attention per sample.
        Padded (the reference): (B, M, D) slots, M = the largest kept count, padding keys masked.
        With DyDiT the gates' decisions are stored in ``record.dydit`` (t_emb is then required)."""
        if self.execution == "packed":
            cells = record.packed_index  # (T,) flat b·L + l, sample after sample, raster order
            z = h.reshape(-1, h.shape[-1]).index_select(0, cells)  # 3. chunk: (T, D)
            z = z + self.pos_embed[0].index_select(0, cells % h.shape[1])
            layout = Packing.from_counts(record.kept_count)
        else:
            z = gather_tokens(h, record.kept_idx)  # 3. chunk: (B, M, D)
            z = z + self.pos_embed[0][record.kept_idx]
            layout = record.slot_mask if self.mask_padding and bool((record.kept_count < z.shape[1]).any()) else None
        dy = {"t_emb": t_emb, "stats": []} if self.dydit else {}
        for block in self.blocks:  # 4. inner DiT blocks on the kept tokens only
            z = block(z, c, layout, **dy)
        z = self.inner_norm(z)
        if self.dydit and isinstance(layout, Packing):  # packed token masks, padded to the record's slots
            record.dydit = DyDiTRecord.from_blocks(dy["stats"], record.slot_mask, layout)
        elif self.dydit:
            real = layout if layout is not None else torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
            record.dydit = DyDiTRecord.from_blocks(dy["stats"], real)
        return self.dechunk(z, record)  # 5. de-chunk: (B, L, D), fp32

    def forward_with_cfg(
        self, x, t, y, cfg_scale: float, tail_dropping_fraction: float = 0.0,
        uncond_tail_dropping_fraction: float | None = None, guidance_channels: int | None = None,
    ):
        """Classifier-free guidance on a [cond; uncond] batch of size 2B (DiT's convention).

        Lite-CFG: ``uncond_tail_dropping_fraction`` gives the unconditional half its own, usually
        larger, tail-drop fraction (e.g. 0.0 for cond, 0.9 for uncond). Packed execution runs every
        sample at its own length; the padded reference pads each half to its own length."""
        from .interface import predict_guided  # the one place guidance lives (it imports this module)

        return predict_guided(self, x, t, y, cfg_scale, tail_dropping_fraction=tail_dropping_fraction,
                              uncond_tail_dropping_fraction=uncond_tail_dropping_fraction,
                              guidance_channels=guidance_channels)
