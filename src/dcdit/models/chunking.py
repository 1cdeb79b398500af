"""Chunking: tail-dropping and the gather of kept tokens into a shorter sequence (paper §3.3).

The result of routing + chunking is a :class:`RoutingRecord`, returned by the model's forward (never
cached on the module) for the ratio loss, the FLOP counter and the visualisations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingRecord:
    """What the router decided for one batch. B samples, L = H·W tokens, M = max kept count.

    p:            (B, L) float32 boundary probabilities.
    natural_mask: (B, L) bool, the router's decision before tail-dropping (ratio loss, STE).
    kept_mask:    (B, L) bool, the tokens that entered the inner blocks.
    kept_idx:     (B, M) long, the grid index of each inner slot: the sample's kept tokens in raster
                  order, then padding filled with its next-highest-p non-kept tokens.
    kept_count:   (B,) long, real kept tokens per sample (slots ≥ kept_count are padding).
    grid:         (H, W).
    dydit:        optional DyDiT gate decisions of the inner blocks (``models.dydit.DyDiTRecord``);
                  None unless the model was built with ``dydit=True``.
    dechunk_pairs: optional (B,) long, the kept-neighbour pairs each sample's de-chunk smoothed over
                  when packed execution chose the window-pairs form (``dcdit.flops`` charges
                  pairs·(D + 1) MACs); None when the grid blur or the direct form ran.
    """

    p: torch.Tensor
    natural_mask: torch.Tensor
    kept_mask: torch.Tensor
    kept_idx: torch.Tensor
    kept_count: torch.Tensor
    grid: tuple[int, int]
    dydit: object | None = None
    dechunk_pairs: torch.Tensor | None = None

    @property
    def slot_mask(self) -> torch.Tensor:
        """(B, M) bool: True where the slot holds a real kept token."""
        slots = torch.arange(self.kept_idx.shape[1], device=self.kept_idx.device)
        return slots[None] < self.kept_count[:, None]

    @property
    def packed_index(self) -> torch.Tensor:
        """(T,) long, T = Σ kept_count: the flat index b·L + l of every kept token, sample after sample
        and in raster order within a sample — the row order of packed execution."""
        return self.kept_mask.reshape(-1).nonzero().squeeze(1)

    @property
    def compression_ratio(self) -> torch.Tensor:
        """(B,) L / kept tokens: the effective downsampling of each sample."""
        return self.p.shape[1] / self.kept_count.float()

    @property
    def natural_compression_ratio(self) -> torch.Tensor:
        """(B,) L / natural boundary count (before tail-dropping)."""
        return self.p.shape[1] / self.natural_mask.sum(1).float()

    @staticmethod
    def cat(records: list["RoutingRecord"]) -> "RoutingRecord":
        """Concatenate along the batch; narrower ``kept_idx`` are widened with padding slots."""
        M = max(r.kept_idx.shape[1] for r in records)
        idx = [torch.cat([r.kept_idx, r.kept_idx[:, -1:].expand(-1, M - r.kept_idx.shape[1])], 1) for r in records]
        fields = (torch.cat([getattr(r, k) for r in records]) for k in ("p", "natural_mask", "kept_mask"))
        out = RoutingRecord(*fields, torch.cat(idx), torch.cat([r.kept_count for r in records]), records[0].grid)
        if all(r.dydit is not None for r in records):
            out.dydit = type(records[0].dydit).cat([r.dydit for r in records])
        if all(r.dechunk_pairs is not None for r in records):
            out.dechunk_pairs = torch.cat([r.dechunk_pairs for r in records])
        return out

    def split(self, sections: int) -> list["RoutingRecord"]:
        """Split along the batch (e.g. the [cond; uncond] halves of a CFG batch)."""
        parts = zip(*(t.chunk(sections) for t in (self.p, self.natural_mask, self.kept_mask, self.kept_idx, self.kept_count)))
        out = [RoutingRecord(*fields, grid=self.grid) for fields in parts]
        if self.dydit is not None:
            for r, d in zip(out, self.dydit.split(sections)):
                r.dydit = d
        if self.dechunk_pairs is not None:
            for r, n in zip(out, self.dechunk_pairs.chunk(sections)):
                r.dechunk_pairs = n
        return out


TAIL_DROP_ROUNDINGS = ("tolerant", "float32")


def drop_counts(n: torch.Tensor, f: torch.Tensor, rounding: str = "tolerant") -> torch.Tensor:
    """How many boundaries a sample drops: ⌊f·n⌋, at most n − 1 (one token always stays).

    ``"tolerant"`` (ours) floors f·n in float64 with a relative tolerance of 1e-6, so that decimal
    fractions such as 0.29·100 (or a float32 0.9·50) give 29 (45), not 28 (44). ``"float32"`` is the
    release's ``(n.float() * f).long()``: f and the product in float32, so 0.7·10 = 6.9999999 drops 6.
    """
    if rounding == "tolerant":
        return torch.floor(f * n.double() + 1e-6 * n.clamp_min(1).double()).long().minimum(n - 1)
    if rounding == "float32":
        return (n.float() * f.float()).long().minimum(n - 1)
    raise ValueError(f"model.tail_drop_rounding must be one of {', '.join(TAIL_DROP_ROUNDINGS)}, got {rounding!r}")


def sort_key(x: torch.Tensor) -> torch.Tensor:
    """float64 x ≥ +0 (no NaN) -> int64 keys in the same order: the bit patterns of non-negative IEEE
    doubles order like their values, so a stable sort of the keys is the stable sort of x. A +0.0 added
    first turns a −0.0 (a negative bit pattern) into +0.0, which compares equal to it. Why: torch's CPU
    stable sort takes 0.31× the time on int64 keys as on float64 ones ((8, 1024), 1 thread, ad-hoc script
    under load: 0.13 ms against 0.41), and routing's two sorts were ~45% of the operator time of route +
    plan + chunk (torch.profiler, spread-budget batch; docs/benchmarks.md, issue 17)."""
    return (x + 0.0).view(torch.int64)


def tail_drop(p: torch.Tensor, mask: torch.Tensor, fraction: float | torch.Tensor, rounding: str = "tolerant") -> torch.Tensor:
    """Drop the ⌊f·n⌋ lowest-p boundaries of each sample (elastic inference, the authors' release; README "Elastic inference").

    p, mask: (B, L); fraction: a float or a (B,) tensor in [0, 1). Returns the kept mask (B, L).
    Equal p values are dropped lowest grid index first; ``rounding`` says how ⌊f·n⌋ is taken
    (:func:`drop_counts`).
    """
    B, L = p.shape
    f = torch.as_tensor(fraction, dtype=torch.float64, device=p.device).expand(B)
    if ((f < 0) | (f >= 1)).any():
        raise ValueError(f"tail_dropping_fraction must lie in [0, 1), got {fraction}")
    if not (f > 0).any():
        return mask
    n = mask.sum(1)
    n_drop = drop_counts(n, f, rounding)  # (B,)
    score = torch.where(mask, p.double(), float("inf"))  # p ∈ [0, 1]: every score is ≥ +0
    order = torch.sort(sort_key(score), dim=1, stable=True).indices  # lowest-p boundaries first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=p.device).expand(B, L))
    return mask & (rank >= n_drop[:, None])


def plan_slots(p: torch.Tensor, kept_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the M = max kept count inner slots of every sample (the paper's padding).

    Returns kept_idx (B, M): kept tokens in raster order, then the next-highest-p non-kept tokens
    (ties to the lower index), and kept_count (B,).
    """
    B, L = p.shape
    kept_count = kept_mask.sum(1)
    M = int(kept_count.max())
    idx = torch.arange(L, device=p.device, dtype=torch.float64).expand(B, L)
    key = torch.where(kept_mask, idx, L + 1.0 - p.double())  # kept first (raster), then by p descending
    kept_idx = torch.sort(sort_key(key), dim=1, stable=True).indices[:, :M]
    return kept_idx, kept_count


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), idx (B, M) -> (B, M, D)."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def route_and_plan(p, natural_mask, fraction, grid, rounding: str = "tolerant") -> RoutingRecord:
    """Tail-drop the natural boundaries and plan the inner slots: the complete routing decision."""
    kept_mask = tail_drop(p, natural_mask, fraction, rounding)
    kept_idx, kept_count = plan_slots(p, kept_mask)
    return RoutingRecord(p, natural_mask, kept_mask, kept_idx, kept_count, tuple(grid))
