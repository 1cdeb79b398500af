"""Token layouts of the inner network: a padded batch (B, M, D) or one packed sequence (T, D).

DC-DiT's samples keep different numbers of tokens n_b. The inner blocks run either

* **packed** (``execution: packed``, the default, as the authors' release with flash-attn varlen):
  the real kept tokens of all samples back to back, T = Σ_b n_b rows, segment b at rows
  [cu_seqlens[b], cu_seqlens[b+1]). Every per-token op (qkv, proj, MLP, norms, modulation) runs on
  the T real rows only; per-sample vectors (adaLN's (B, 6D) modulators, DyDiT's width masks) are
  expanded to their segment's rows; attention stays inside each segment (``models/attention.py``).
* **padded** (``execution: padded``, the reference): every sample padded to M = max n_b with a
  key-padding mask, so the padded rows cost as much as real ones.

A block receives its layout as one object with the same small interface, so one block body serves
both: ``per_token(v)`` broadcasts a per-sample (B, K) tensor to the token layout, ``attend(qkv)``
runs attention, ``real(x)`` marks the real tokens and ``select(rows)`` restricts to some samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import padded_attention, varlen_attention


@dataclass
class Padded:
    """(B, M, ·) tokens with an optional key-padding mask (B, M) bool, True = real (None: all real)."""

    kv_mask: torch.Tensor | None = None

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, 1, K), broadcasting over the M slots."""
        return v.unsqueeze(1)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, M, 3, heads, hd) -> (B, M, heads, hd)."""
        return padded_attention(qkv, self.kv_mask)

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M) bool: the slots that hold real tokens."""
        return self.kv_mask if self.kv_mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def select(self, rows: torch.Tensor) -> tuple[torch.Tensor, "Padded"]:
        """The samples ``rows``: (index along dim 0, their layout)."""
        return rows, Padded(None if self.kv_mask is None else self.kv_mask[rows])


@dataclass
class Packing:
    """B variable-length segments packed into T = Σ sizes rows, in sample order.

    sizes:      the segment lengths n_b as Python ints (for ``split``);
    cu_seqlens: (B + 1,) int32 offsets [0, n_0, n_0 + n_1, …, T] (flash-attn's format);
    seg_ids:    (T,) long, the sample each row belongs to.
    """

    sizes: tuple[int, ...]
    cu_seqlens: torch.Tensor
    seg_ids: torch.Tensor

    @staticmethod
    def from_counts(counts: torch.Tensor) -> "Packing":
        """(B,) long segment lengths (e.g. ``RoutingRecord.kept_count``) -> the packing."""
        sizes = tuple(int(n) for n in counts.tolist())
        if min(sizes, default=0) < 1:
            raise ValueError(f"every packed segment needs at least one token, got lengths {sizes}")
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        seg = torch.repeat_interleave(torch.arange(len(sizes), device=counts.device), counts, output_size=sum(sizes))
        return Packing(sizes, cu, seg)

    @property
    def batch(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        """T, the number of packed rows."""
        return int(self.seg_ids.shape[0])

    @property
    def max_len(self) -> int:
        return max(self.sizes)

    @property
    def one_length(self) -> bool:
        """Every segment has the same length."""
        return len(set(self.sizes)) == 1

    @property
    def starts(self) -> tuple[int, ...]:
        """The first row of every segment, as Python ints."""
        return tuple(itertools.accumulate(self.sizes[:-1], initial=0))

    def per_token(self, v: torch.Tensor) -> torch.Tensor:
        """(B, K) per-sample values -> (T, K), row t taking its sample's values."""
        return v.index_select(0, self.seg_ids)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (T, 3, heads, hd) -> (T, heads, hd), attention within each segment."""
        return varlen_attention(qkv, self)

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """(T,) bool, all True: a packed sequence has no padding."""
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    def select(self, rows: torch.Tensor) -> tuple[torch.Tensor, "Packing"]:
        """The samples ``rows`` (ascending): (their packed row positions (T',), their packing)."""
        keep = torch.zeros(self.batch, dtype=torch.bool, device=self.seg_ids.device)
        keep[rows] = True
        positions = keep[self.seg_ids].nonzero().squeeze(1)
        counts = torch.as_tensor(self.sizes, device=self.seg_ids.device)[rows]
        return positions, Packing.from_counts(counts)

    def to_padded(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(T, ...) -> (B, width, ...) with the segments left-aligned and zeros after them
        (width defaults to the longest segment); differentiable."""
        width = self.max_len if width is None else width
        slot = torch.arange(self.total, device=x.device) - self.cu_seqlens.long()[self.seg_ids]
        out = x.new_zeros(self.batch, width, *x.shape[1:])
        return out.index_put((self.seg_ids, slot), x)


def as_layout(layout) -> Padded | Packing:
    """None (a plain batch), a (B, M) bool key mask, a :class:`Padded` or a :class:`Packing`."""
    if isinstance(layout, (Padded, Packing)):
        return layout
    return Padded(layout)
