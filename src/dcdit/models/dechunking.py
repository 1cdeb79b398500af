"""De-chunking: back from the M kept tokens to the full H×W grid (paper §3.4).

1. Confidence-weighted Gaussian smoothing over the real kept tokens (p clamped to [1e-4, 1 − 1e-4]):
   W_ij = exp(−d²_ij / 2σ²) · p_j,  W̃ = W / Σ_j W_ij,  h̃_i = Σ_j W̃_ij h_j,  out_i = p_i h_i + (1 − p_i) h̃_i,
   with d_ij the Euclidean distance of the tokens' grid positions (j runs over every kept token, i included).
2. Plug-back: each of the L grid positions takes ``out`` of its nearest kept token (Euclidean on the
   grid; ties go to the lowest grid index).

Both run in float32 even under autocast. Three implementations of the same formula:

* **Window pairs** (packed execution, z (T, D), chosen per batch when it is cheaper): Σ_j W_ij h_j
  over the pairs of kept tokens inside the truncated Gaussian window (|Δr|, |Δc| ≤ R = ⌊σ·√60⌋, the
  per-axis cut of the grid form below: R = 7 at σ = 1), as a constant sparse (T, T) matrix
  K_ij = exp(−d²_ij/2σ²), block-diagonal per sample: numerator K @ (p·h), denominator K @ p. K is symmetric, so the backward
  is K @ grad too; it costs (pairs)·(D + 1) MACs each way, pairs ≈ T·(2R + 1)²·(kept fraction).
  K is built without a table of the window: in every window row the kept neighbours are one
  contiguous run of packed rows (packing is raster order), found from the cumulative kept count.
* **On the grid** (packed execution, z (T, D), chosen when the pairs are many): the Gaussian
  factorises, exp(−d²/2σ²) = exp(−Δr²/2σ²)·exp(−Δc²/2σ²), so Σ_j W_ij h_j is a separable blur.
  p_j·h_j and p_j are scattered onto the H×W grid (zero elsewhere), blurred along rows then columns
  by two dense matmuls with the truncated 1-D kernel matrices, and numerator / denominator are read
  back at the kept cells: L·(H + W)·(D + 1) MACs per sample, whatever M is.
* **Direct** (padded execution, z (B, M, D), the reference): the (M, M) weight matrix and the (L, M)
  distance table, as in the release: O(M²·D + L·M).

Packed execution's plug-back index comes from a two-pass exact nearest-neighbour search (nearest kept
row per column, then the best column per cell): an (H, W, W) integer table instead of the (L, M)
distance table. Which packed form is faster is measured in docs/benchmarks.md ("De-chunk on the grid").
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chunking import RoutingRecord, gather_tokens


def grid_coords(idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster indices (...,) -> (..., 2) float (row, col)."""
    W = grid[1]
    return torch.stack([torch.div(idx, W, rounding_mode="floor"), idx % W], dim=-1).float()


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, 2), (B, m, 2) integer grid coordinates -> (B, n, m) squared Euclidean distances.

    |a|² + |b|² − 2 a·b with one batched matmul instead of an (n, m, 2) difference tensor. Integer
    coordinates below 2^11 keep every term an exact float32 integer, so the result (and any tie) is exact.
    """
    cross = torch.bmm(a, b.transpose(1, 2))
    return (a * a).sum(-1, keepdim=True) + (b * b).sum(-1)[:, None, :] - 2 * cross


def nearest_kept_slot(record: RoutingRecord) -> torch.Tensor:
    """(B, L) long: for every grid position, the inner slot of its nearest real kept token.

    Real kept tokens occupy the first slots in raster order, and argmin returns the first minimum,
    so ties resolve to the lowest grid index. Squared distances of integer coordinates are exact.
    """
    H, W = record.grid
    B = record.kept_idx.shape[0]
    all_pos = grid_coords(torch.arange(H * W, device=record.kept_idx.device), record.grid).expand(B, -1, -1)
    d2 = squared_distances(all_pos, grid_coords(record.kept_idx, record.grid))  # (B, L, M)
    d2 = d2.masked_fill(~record.slot_mask[:, None, :], float("inf"))
    return d2.argmin(dim=-1)


# Gaussian weights below exp(−60) ≈ 9e-27 are set to exactly 0. A row's sum is at least its own
# weight p_i ≥ 1e-4, so dropping them changes no float32 result; keeping them would make exp and bmm
# run on denormal floats, which is 5–20× slower on CPUs (measured: exp over a (32, 306, 306) tensor
# 167 ms vs 9 ms, the bmm 48 ms vs 10 ms).
_NEGLIGIBLE_EXPONENT = 60.0


#: The grid form truncates each 1-D factor of the Gaussian where exp(−Δ²/2σ²) < exp(−30) ≈ 9e-14
#: (|Δ| > 7.7σ). The dropped weights sum to the Gaussian's tail mass, ~1e-12·σ, against a row sum
#: ≥ p_i ≥ 1e-4: below 1e-8 relative even at the p clamp. A per-axis cut at exp(−60) would let
#: products of two factors reach exp(−120) ≈ 8e-53, a denormal, on which matmuls slow down (above).
_AXIS_NEGLIGIBLE_EXPONENT = 30.0


def axis_kernel(n: int, sigma: float, device=None) -> torch.Tensor:
    """(n,) float32: k[Δ] = exp(−Δ²/2σ²) for Δ = 0 … n − 1, 0 where the exponent exceeds the cut.
    The one place of the per-axis truncation rule (both packed forms use it)."""
    d = torch.arange(n, device=device, dtype=torch.float32)
    e = d**2 / (2 * sigma**2)
    return torch.where(e <= _AXIS_NEGLIGIBLE_EXPONENT, torch.exp(-e.clamp(max=_AXIS_NEGLIGIBLE_EXPONENT)), 0.0)


def gaussian_factor(n: int, sigma: float, device=None) -> torch.Tensor:
    """(n, n) float32: G[a, b] = exp(−(a − b)²/2σ²), 0 where the exponent exceeds the cut."""
    a = torch.arange(n, device=device)
    return axis_kernel(n, sigma, device)[(a[:, None] - a[None, :]).abs()]


@functools.lru_cache(maxsize=64)
def axis_radius(n: int, sigma: float) -> int:
    """The largest |Δ| < n that :func:`axis_kernel`'s cut keeps, as a Python int. Cached: it is the same
    for every batch, and computing it costs ~10 small ops and a device sync per call."""
    return int((axis_kernel(n, sigma) > 0).sum()) - 1


@functools.lru_cache(maxsize=16)
def window_weights(grid: tuple[int, int], sigma: float, R: int, device: torch.device) -> torch.Tensor:
    """((2R + 1)·(2W − 1),) float32 over the row offsets |Δr| ≤ R (the window's, usually
    axis_radius(H, σ)): entry (Δr + R)·(2W − 1) + Δc + W − 1 is exp(−Δr²/2σ²)·exp(−Δc²/2σ²), each
    factor cut by :func:`axis_kernel`. Cached per grid, σ, R and device (a constant that took ~20 small
    ops per batch to build); made outside inference mode so that training may read it."""
    H, W = grid
    with torch.inference_mode(False):
        dr = torch.arange(-R, R + 1, device=device).abs()
        dc = torch.arange(-(W - 1), W, device=device).abs()
        return (axis_kernel(H, sigma, device)[dr][:, None] * axis_kernel(W, sigma, device)[dc][None, :]).reshape(-1)


def separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, C): out[r, c] = Σ_{r', c'} G[r, r'] G[c, c'] x[r', c'].

    Rows then columns, each one batched matmul with the (dense, truncated) kernel matrix. The passes
    are memory-bound (K = W or H multiply-adds per value read); a variant that skips the empty cells of
    the first pass (rows padded to their kept count) measured no faster on the 2-core CPU
    (docs/benchmarks.md, "De-chunk on the grid")."""
    B, H, W, C = x.shape
    x = torch.matmul(gaussian_factor(W, sigma, x.device), x.reshape(B * H, W, C))  # along each row
    x = torch.matmul(gaussian_factor(H, sigma, x.device), x.reshape(B, H, W * C))  # along each column
    return x.reshape(B, H, W, C)


def nearest_kept_cell(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """kept (B, L) bool -> (B, L) long: the raster index of each cell's nearest kept cell (Euclidean
    grid distance, ties to the lowest raster index). Every sample needs at least one kept cell.

    Pass 1, per column c': the nearest kept row above and below every row r (cumulative max / min),
    the upper one on a tie. Pass 2, per cell (r, c): the column c' minimising (c − c')² + Δr(r, c')²,
    compared as the integer key d²·L + raster index, so equal distances go to the lowest index. The
    winner of a tie set lies in its column's candidate (the upper of two equal rows has the lower
    index), so the two passes give the exact global rule.

    The key splits as (c − c')²·L + [Δr²·L + raster index of the candidate]: a (W, W') table plus a
    (B, H, W') one, so the (B, H, W, W') table is one broadcast add and one min (int32 when the keys
    fit): 0.31–0.35× the time of forming d², d²·L and the key as separate int64 tables (spread-budget
    batch, 1 thread, ad-hoc interleaved script under load; docs/benchmarks.md, issue 17)."""
    H, W = grid
    B, L = kept.shape
    far = 4 * (H + W)  # farther than any real distance on the grid
    # largest key: a fake candidate (|Δr| ≤ H + far) in the farthest column; int32 when it fits
    dtype = torch.int32 if ((H + far) ** 2 + W ** 2 + H + far + 1) * L < 2 ** 31 else torch.long
    k = kept.view(B, H, W)
    rows = torch.arange(H, device=kept.device, dtype=dtype).view(1, H, 1)
    above = torch.where(k, rows, -far).cummax(dim=1).values  # nearest kept row ≤ r, per column
    below = torch.where(k, rows, H + far).flip(1).cummin(dim=1).values.flip(1)  # nearest kept row ≥ r
    up, down = rows - above, below - rows
    cand = torch.where(up <= down, above, below)  # (B, H, W'): candidate row of column c' for row r
    cols = torch.arange(W, device=kept.device, dtype=dtype)
    row_key = torch.minimum(up, down).square_() * L + cand * W + cols  # (B, H, W')
    col_key = (cols[:, None] - cols[None, :]).square_() * L  # (W, W')
    key = torch.add(row_key[:, :, None, :], col_key).amin(dim=-1)  # (B, H, W)
    return key.remainder_(L).view(B, L).long()


@dataclass
class WindowRanges:
    """The kept neighbours of every packed token inside the truncated window, as runs of packed rows.

    start, count: (T, 2R + 1) long, row offset Δr = −R … R: the kept tokens of grid row r + Δr with
                  columns in [c − R', c + R'] are the packed rows start … start + count − 1
                  (packing is raster order within a sample; rows off the grid have count 0).
    col:          (T,) long, each packed token's grid column c.
    radius:       (R, R'), the window's half-sizes along rows and columns.
    grid:         (H, W).
    pairs:        Σ count: the (ordered) neighbour pairs, i included — K's non-zeros.
    """

    start: torch.Tensor
    count: torch.Tensor
    col: torch.Tensor
    radius: tuple[int, int]
    grid: tuple[int, int]
    pairs: int

    def per_sample(self, kept_count: torch.Tensor) -> torch.Tensor:
        """(B,) long: the pairs (K's non-zeros) of each sample; ``kept_count`` (B,) sizes its rows."""
        through = self.count.sum(1).cumsum(0)  # pairs up to each packed row (integers: exact)
        totals = through[kept_count.to(through.device).cumsum(0) - 1]  # up to each sample's last row
        return totals - torch.cat([totals.new_zeros(1), totals[:-1]])


def window_ranges(kept: torch.Tensor, grid: tuple[int, int], sigma: float) -> WindowRanges:
    """kept (B, L) bool -> the window neighbours of every kept token (packed order), in O(T·(2R + 1)).

    first[b, R + r, c] is the packed row of the first kept cell at or after (r, c) in raster order
    (c = W: after row r), from the cumulative kept count; rows off the grid are padding with equal
    bounds, i.e. empty runs. (Built from two pads and one cumsum: ~35 ops instead of ~60, 0.68–0.86×
    the time on the spread-budget batch; docs/benchmarks.md, issue 17.)"""
    H, W = grid
    B, L = kept.shape
    Rr, Rc = axis_radius(H, sigma), axis_radius(W, sigma)  # largest |Δr|, |Δc| kept by the per-axis cut
    # an empty column 0 in front of every row: its running count is the count before the row
    counts = F.pad(kept.view(B, H, W), (1, 0)).reshape(-1).cumsum(0).view(B, H, W + 1)
    first = F.pad(counts, (0, 0, Rr, Rr)).view(-1, W + 1)  # (B·(H + 2R), W + 1), off-grid rows 0
    cells = kept.reshape(-1).nonzero().squeeze(1)  # (T,) flat b·L + l: the packed order
    c = cells % W
    top = cells // W + cells // L * (2 * Rr)  # row of `first` holding the token's row r − R (offset R)
    rows = top[:, None] + torch.arange(2 * Rr + 1, device=kept.device)  # (T, 2R + 1)
    start = first[rows, (c - Rc).clamp_(min=0)[:, None]]
    count = first[rows, (c + Rc + 1).clamp_(max=W)[:, None]] - start
    return WindowRanges(start, count, c, (Rr, Rc), (H, W), int(count.sum()))


def pair_kernel(ranges: WindowRanges, sigma: float, dtype=torch.float32) -> torch.Tensor:
    """The (T, T) sparse CSR matrix K_ij = exp(−Δr²/2σ²)·exp(−Δc²/2σ²) over the window pairs
    (block-diagonal per sample, symmetric, columns sorted within each row)."""
    start, count = ranges.start, ranges.count
    T, n_rows = start.shape
    Rr, _ = ranges.radius
    device = start.device
    n = count.reshape(-1)
    crow = torch.zeros(T + 1, dtype=torch.long, device=device)
    torch.cumsum(count.sum(1), 0, out=crow[1:])
    run_begin = n.cumsum(0) - n  # position of each run in the non-zeros
    idx = torch.arange(ranges.pairs, device=device)
    col = idx + torch.repeat_interleave(start.reshape(-1) - run_begin, n, output_size=ranges.pairs)
    # weight table over (Δr + R, Δc + W − 1); run (t, Δr) looks up Δc = c_j − c_t
    W = ranges.grid[1]
    table = window_weights(ranges.grid, sigma, Rr, device)
    run_code = (torch.arange(n_rows, device=device) * (2 * W - 1))[None, :] + (W - 1) - ranges.col[:, None]
    lookup = torch.repeat_interleave(run_code.reshape(-1), n, output_size=ranges.pairs)
    lookup += ranges.col.index_select(0, col)
    values = table.index_select(0, lookup).to(dtype)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, (T, T), check_invariants=False)


class SymmetricKernelProduct(torch.autograd.Function):
    """K @ x for a constant symmetric (sparse) K: the gradient w.r.t. x is Kᵀ @ grad = K @ grad, so
    the backward reuses K (no transpose of a CSR matrix) and nothing flows to K."""

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.kernel = kernel  # a constant: not saved for backward as an input
        return kernel @ x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.kernel @ grad


#: The window-pairs form is chosen when PAIRS_COST_FACTOR · pairs < B·L·(H + W) (the grid form's
#: MACs per channel). One sparse MAC costs a few dense ones (an indexed read per non-zero, against
#: the blur's dense matmuls); the factor is the measured crossover on the 2-core CPU
#: (docs/benchmarks.md, "De-chunk on the grid").
PAIRS_COST_FACTOR = 2.0
#: ... and only when the grid blur has at least this many MACs: building K is a dozen small ops
#: (~0.3 ms more than the blur's setup, measured on the 2-core CPU), which the blur of a small grid
#: (e.g. 4×6, D 32: 8·10³ MACs) does not repay.
PAIRS_MIN_GRID_MACS = 10**7


def prefer_pairs(pairs: int, batch: int, grid: tuple[int, int], channels: int) -> bool:
    """Whether the window-pairs smoothing is the cheaper packed form for this batch of ``channels``-wide
    tokens (the grid form's cost: B·L·(H + W)·(D + 1) MACs)."""
    H, W = grid
    grid_macs_per_channel = batch * H * W * (H + W)
    return grid_macs_per_channel * (channels + 1) >= PAIRS_MIN_GRID_MACS and \
        PAIRS_COST_FACTOR * pairs < grid_macs_per_channel


class DeChunk(nn.Module):
    """Inner outputs + routing record -> (B, L, D) on the full grid. z is packed (T, D) (the kept
    tokens of all samples in raster order, sample after sample: the window-pairs or grid form) or
    padded (B, M, D) in the record's slots (the direct form)."""

    PACKED_FORMS = ("auto", "pairs", "grid")

    def __init__(self, sigma: float = 1.0, eps: float = 0.0, packed_form: str = "auto"):
        super().__init__()
        if packed_form not in self.PACKED_FORMS:
            raise ValueError(f"packed_form must be one of {self.PACKED_FORMS}, got {packed_form!r}")
        self.sigma = sigma
        self.eps = eps  # added to every row's weight sum; the release adds 1e-8
        self.packed_form = packed_form  # "auto": per batch by prefer_pairs; the others for tests and benchmarks

    def smooth(self, z: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """Gaussian smoothing over the real kept tokens: (B, M, D) -> (B, M, D)."""
        p = record.p.gather(1, record.kept_idx).clamp(1e-4, 1 - 1e-4)  # (B, M)
        pos = grid_coords(record.kept_idx, record.grid)  # (B, M, 2)
        d2 = squared_distances(pos, pos)  # (B, M, M)
        e = d2 / (2 * self.sigma**2)  # (B, M, M), no gradient (grid positions)
        w = torch.where(e <= _NEGLIGIBLE_EXPONENT, torch.exp(-e.clamp(max=_NEGLIGIBLE_EXPONENT)), 0.0) * p[:, None, :]
        real = record.slot_mask  # (B, M)
        w = w * real[:, None, :]  # padding slots are not sources
        # A real row always has W_ii = p_i > 0. A padding row (never read by plug-back) may underflow
        # to an all-zero row: add 1 to its denominator so no 0/0 reaches the backward pass.
        w = w / (w.sum(-1, keepdim=True) + (~real)[..., None] + self.eps)
        h_tilde = torch.bmm(w, z)
        return p[..., None] * z + (1 - p[..., None]) * h_tilde

    def smooth_on_grid(self, z: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """The same smoothing for packed tokens, as a blur on the grid: (T, D) -> (T, D)."""
        B, L = record.kept_mask.shape
        cells = record.packed_index  # (T,) flat index b·L + l of every packed token
        p = record.p.reshape(-1)[cells].clamp(1e-4, 1 - 1e-4)[:, None]  # (T, 1)
        src = torch.cat([p * z, p], dim=1)  # numerator and denominator sources, (T, D + 1)
        grid = src.new_zeros(B * L, src.shape[1]).index_copy_(0, cells, src)  # in place: no second grid
        blurred = separable_blur(grid.view(B, *record.grid, -1), self.sigma).reshape(B * L, -1)[cells]
        h_tilde = blurred[:, :-1] / (blurred[:, -1:] + self.eps)  # the own cell's weight p_i > 0 keeps it finite
        return p * z + (1 - p) * h_tilde

    def smooth_pairs(self, z: torch.Tensor, record: RoutingRecord, ranges: WindowRanges | None = None) -> torch.Tensor:
        """The same smoothing for packed tokens over the window pairs: (T, D) -> (T, D)."""
        if ranges is None:
            ranges = window_ranges(record.kept_mask, record.grid, self.sigma)
        kernel = pair_kernel(ranges, self.sigma, z.dtype)
        p = record.p.reshape(-1)[record.packed_index].clamp(1e-4, 1 - 1e-4)[:, None].to(z.dtype)  # (T, 1)
        pz = p * z
        numerator = SymmetricKernelProduct.apply(kernel, pz)
        denominator = SymmetricKernelProduct.apply(kernel, p) + self.eps  # ≥ the own weight p_i > 0
        return torch.addcmul(pz, (1 - p) / denominator, numerator)  # p h + (1 − p) h̃

    def _pairs_plan(self, record: RoutingRecord, channels: int) -> WindowRanges | None:
        """The window pairs when the packed smoothing of this batch runs the pairs form, else None (grid)."""
        if self.packed_form == "grid":
            return None
        ranges = window_ranges(record.kept_mask, record.grid, self.sigma)
        batch = record.kept_mask.shape[0]
        if self.packed_form == "pairs" or prefer_pairs(ranges.pairs, batch, record.grid, channels):
            return ranges
        return None

    def smooth_packed(self, z: torch.Tensor, record: RoutingRecord) -> tuple[torch.Tensor, WindowRanges | None]:
        """Packed smoothing (T, D) -> ((T, D), the window pairs it ran over or None for the grid blur),
        in the cheaper form for this batch (``packed_form``)."""
        ranges = self._pairs_plan(record, z.shape[1])
        return (self.smooth_on_grid(z, record) if ranges is None else self.smooth_pairs(z, record, ranges)), ranges

    def plug_back(self, out: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """Packed (T, D) de-chunked tokens -> (B, L, D): every cell takes its nearest kept token."""
        B, L = record.kept_mask.shape
        kept = record.kept_mask.reshape(-1)
        row_of = kept.cumsum(0) - 1  # packed row of each kept cell (packing is raster order)
        nearest = nearest_kept_cell(record.kept_mask, record.grid)  # (B, L) raster index
        offsets = torch.arange(B, device=nearest.device)[:, None] * L
        return out.index_select(0, row_of[(nearest + offsets).view(-1)]).view(B, L, -1)

    def forward(self, z: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        with torch.autocast(device_type=z.device.type, enabled=False):
            if z.dim() == 2:  # packed: window pairs or grid blur
                out, ranges = self.smooth_packed(z.float(), record)
                # the form that ran, for dcdit.flops (pairs·(D + 1) MACs per sample); None: the grid blur
                record.dechunk_pairs = None if ranges is None else ranges.per_sample(record.kept_count)
                return self.plug_back(out, record)
            out = self.smooth(z.float(), record)
            return gather_tokens(out, nearest_kept_slot(record))
