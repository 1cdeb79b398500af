"""The study's decision rules, fixed before any number exists: which guidance scale every model is
sampled with, and the verdict on each claim (a)–(e) of docs/results.md ("holds", "does not hold" or
"undecided", with the reason). Pure functions of the scores; ``tests/scripts`` checks them on hand-made
numbers.

A score is a dict with ``mnist_fid``, ``fid_ci`` (lo, hi), ``class_accuracy``, ``acc_ci``, ``mnist_is``
(the bootstrap 95% intervals of :func:`dcdit.evaluation.metrics.bootstrap_interval`). Two models differ
on a metric only when their intervals do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

# A model that reads as the asked digit less often than this does not draw digits, and its MNIST-FID
# orders nothing (docs/results.md: at 1,000 steps every model was at chance and FIDs of 440–700 swapped
# order between seeds). The demo recipe's checkpoint reaches 0.935.
DRAWS_DIGITS = 0.5
# Guidance selection: scales whose accuracy is within this of the best count as tied (one binomial
# standard error at 100 samples and p ≈ 0.9); the lowest MNIST-FID among them wins.
SCALE_ACC_TIE = 0.03
# (b): the foreground must be kept by this much more than the background at t ≤ 250 (200 digits ×
# ~100 foreground tokens: the sampling error of a retention is below 0.01).
SEGMENTATION_MARGIN = 0.05
# (c): compression at t ≥ 750 must exceed the one at t ≤ 250 by this factor.
COMPRESSION_FACTOR = 1.05
# (e): up to tail-drop 0.5 the accuracy may fall by at most SMOOTH_ACC_DROP and the MNIST-FID grow by
# at most SMOOTH_FID_FACTOR×; an accuracy fall beyond COLLAPSE_ACC_DROP at f ≤ 0.5 is a cliff.
SMOOTH_ACC_DROP = 0.10
SMOOTH_FID_FACTOR = 2.0
COLLAPSE_ACC_DROP = 0.30


@dataclass(frozen=True)
class Verdict:
    claim: str
    outcome: str  # "holds" | "does not hold" | "undecided"
    reason: str


def choose_guidance_scale(rows: dict[float, dict]) -> tuple[float, str]:
    """The scale with the highest class accuracy; among those within :data:`SCALE_ACC_TIE` of it, the
    lowest MNIST-FID. Returns (scale, the rule applied in words)."""
    if not rows:
        raise ValueError("no guidance scale was evaluated")
    best = max(r["class_accuracy"] for r in rows.values())
    tied = {s: r for s, r in rows.items() if r["class_accuracy"] >= best - SCALE_ACC_TIE}
    scale = min(tied, key=lambda s: tied[s]["mnist_fid"])
    return scale, (f"highest class accuracy ({best:.3f}); scales within {SCALE_ACC_TIE} of it: "
                   f"{', '.join(f'{s:g}' for s in sorted(tied))}; lowest MNIST-FID among them: {scale:g} "
                   f"({tied[scale]['mnist_fid']:.1f})")


def ci_order(a: dict, b: dict, key: str = "fid_ci") -> str:
    """'below' / 'above' when a's interval lies entirely below / above b's, else 'overlap'."""
    (alo, ahi), (blo, bhi) = a[key], b[key]
    return "below" if ahi < blo else "above" if alo > bhi else "overlap"


def _fid(s: dict) -> str:
    return f"{s['mnist_fid']:.1f} [{s['fid_ci'][0]:.1f}, {s['fid_ci'][1]:.1f}]"


def verdict_a(per_seed: dict[int, dict[str, dict]]) -> Verdict:
    """(a) DC-DiT beats the isoparam and the isoflop DiT. ``per_seed[seed]`` maps dcdit_release /
    isoparam / isoflop to scores. Per seed and baseline, DC-DiT is better (worse) when its MNIST-FID
    interval lies below (above) the baseline's. Holds: better than both on every seed. Does not hold:
    worse than one baseline on every seed. Otherwise (overlaps, seeds that disagree) undecided; also
    undecided when the DC-DiT of some seed does not draw digits."""
    seeds = sorted(s for s, m in per_seed.items() if all(k in m for k in ("dcdit_release", "isoparam", "isoflop")))
    if not seeds:
        return Verdict("a", "undecided", "the DC-DiT and both baselines of a seed are not evaluated yet")
    blind = [s for s in seeds if per_seed[s]["dcdit_release"]["class_accuracy"] < DRAWS_DIGITS]
    if blind:
        return Verdict("a", "undecided", f"the DC-DiT of seed(s) {blind} does not draw digits (class accuracy < {DRAWS_DIGITS})")
    order = {b: [ci_order(per_seed[s]["dcdit_release"], per_seed[s][b]) for s in seeds] for b in ("isoparam", "isoflop")}
    detail = "; ".join(f"seed {s}: DC-DiT {_fid(per_seed[s]['dcdit_release'])}, isoparam {_fid(per_seed[s]['isoparam'])}, "
                       f"isoflop {_fid(per_seed[s]['isoflop'])}" for s in seeds)
    n = f"{len(seeds)} seed(s)"
    if all(o == "below" for o in order["isoparam"] + order["isoflop"]):
        return Verdict("a", "holds", f"MNIST-FID interval below both baselines' on all {n} ({detail})")
    losers = [b for b, os in order.items() if all(o == "above" for o in os)]
    if losers:
        return Verdict("a", "does not hold", f"MNIST-FID interval above the {' and '.join(losers)} DiT's on all {n} ({detail})")
    return Verdict("a", "undecided", f"intervals overlap or seeds disagree (isoparam: {order['isoparam']}, "
                                     f"isoflop: {order['isoflop']}; 'below' = DC-DiT better) ({detail})")


def _low_high(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in rows if r["t"] <= 250], [r for r in rows if r["t"] >= 750]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _router_verdict(claim: str, values: dict[str, float], good: float, bad: float, detail: str, what: str) -> Verdict:
    """Holds when every analysed DC-DiT's value is ≥ ``good``, does not hold when every one is ≤ ``bad``."""
    if not values:
        return Verdict(claim, "undecided", "no DC-DiT router analysed at the timesteps the rule needs yet")
    if all(v >= good for v in values.values()):
        return Verdict(claim, "holds", f"{what} >= {good:g} for every analysed DC-DiT ({detail})")
    if all(v <= bad for v in values.values()):
        return Verdict(claim, "does not hold", f"{what} <= {bad:g} for every analysed DC-DiT ({detail})")
    return Verdict(claim, "undecided", f"{what} between {bad:g} and {good:g}, or mixed ({detail})")


def verdict_b(retention: dict[str, list[dict]]) -> Verdict:
    """(b) The router separates object from background. For every analysed DC-DiT (``dcdit
    analyze-router`` rows): at t ≤ 250 the kept share of foreground minus that of background tokens.
    Holds when ≥ :data:`SEGMENTATION_MARGIN` for all; does not hold when ≤ 0 for all; else undecided."""
    gaps = {name: _mean(low, "mean_fg_retention") - _mean(low, "mean_bg_retention")
            for name, rows in retention.items() if (low := _low_high(rows)[0])}
    return _router_verdict("b", gaps, SEGMENTATION_MARGIN, 0.0, ", ".join(f"{n}: {g:+.3f}" for n, g in gaps.items()),
                           "fg − bg share of tokens kept at t <= 250")


def _compression_ratio(rows: list[dict]) -> float | None:
    low, high = _low_high(rows)
    return _mean(high, "mean_compression_ratio") / _mean(low, "mean_compression_ratio") if low and high else None


def verdict_c(retention: dict[str, list[dict]]) -> Verdict:
    """(c) Fewer tokens at noisy timesteps: mean compression at t ≥ 750 over that at t ≤ 250. Holds when
    ≥ :data:`COMPRESSION_FACTOR` for every analysed DC-DiT, does not hold when ≤ 1 for all, else undecided."""
    ratios = {name: r for name, rows in retention.items() if (r := _compression_ratio(rows)) is not None}
    return _router_verdict("c", ratios, COMPRESSION_FACTOR, 1.0, ", ".join(f"{n}: ×{r:.2f}" for n, r in ratios.items()),
                           "compression at t >= 750 ÷ at t <= 250")


def verdict_d(per_seed: dict[int, tuple[dict | None, dict | None]]) -> Verdict:
    """(d) The learned router beats the random one. ``per_seed[seed]``: (the learned DC-DiT's score,
    the random router's), same steps and batches. Per seed, learned is better (worse) when its MNIST-FID
    interval lies below (above) the random router's. Holds: better on every seed evaluated; does not
    hold: worse on every one; otherwise (overlaps, seeds that disagree) undecided, and undecided when a
    learned model does not draw digits."""
    seeds = sorted(s for s, (learned, rnd) in per_seed.items() if learned is not None and rnd is not None)
    if not seeds:
        return Verdict("d", "undecided", "no seed has both dcdit_release and random evaluated yet")
    blind = [s for s in seeds if per_seed[s][0]["class_accuracy"] < DRAWS_DIGITS]
    if blind:
        return Verdict("d", "undecided", f"the learned-router DC-DiT of seed(s) {blind} does not draw digits "
                                         f"(class accuracy < {DRAWS_DIGITS})")
    order = [ci_order(*per_seed[s]) for s in seeds]
    detail = "; ".join(f"seed {s}: learned {_fid(per_seed[s][0])}, random {_fid(per_seed[s][1])}" for s in seeds)
    n = f"{len(seeds)} seed(s)"
    if all(o == "below" for o in order):
        return Verdict("d", "holds", f"MNIST-FID interval below the random router's on all {n} ({detail})")
    if all(o == "above" for o in order):
        return Verdict("d", "does not hold", f"MNIST-FID interval above the random router's on all {n} ({detail})")
    return Verdict("d", "undecided", f"intervals overlap or seeds disagree ({order}; 'below' = learned better) ({detail})")


def verdict_e(curve: dict[float, dict], model: str) -> Verdict:
    """(e) Smooth degradation under tail-dropping. ``curve``: tail fraction -> score of one model.
    Against f = 0, for f ≤ 0.5: holds when the accuracy falls by at most :data:`SMOOTH_ACC_DROP` and the
    MNIST-FID grows at most :data:`SMOOTH_FID_FACTOR`×; does not hold when the accuracy falls by more than
    :data:`COLLAPSE_ACC_DROP` at some f (a cliff); otherwise undecided. Undecided too when the model
    does not draw digits at f = 0 (nothing to degrade)."""
    if 0.0 not in curve or not any(0 < f <= 0.5 for f in curve):
        return Verdict("e", "undecided", f"{model}: f = 0 and some f <= 0.5 are not evaluated yet")
    base = curve[0.0]
    if base["class_accuracy"] < DRAWS_DIGITS:
        return Verdict("e", "undecided", f"{model} does not draw digits at f = 0 (class accuracy < {DRAWS_DIGITS})")
    parts = {f: (base["class_accuracy"] - s["class_accuracy"], s["mnist_fid"] / base["mnist_fid"])
             for f, s in sorted(curve.items()) if 0 < f <= 0.5}
    detail = f"{model}: " + ", ".join(f"f={f:g}: accuracy −{d:.3f}, MNIST-FID ×{r:.2f}" for f, (d, r) in parts.items())
    if any(d > COLLAPSE_ACC_DROP for d, _ in parts.values()):
        return Verdict("e", "does not hold", f"accuracy falls by more than {COLLAPSE_ACC_DROP} ({detail})")
    if all(d <= SMOOTH_ACC_DROP and r <= SMOOTH_FID_FACTOR for d, r in parts.values()):
        return Verdict("e", "holds", f"accuracy within {SMOOTH_ACC_DROP} and MNIST-FID within ×{SMOOTH_FID_FACTOR} up to f = 0.5 ({detail})")
    return Verdict("e", "undecided", f"between smooth and a cliff ({detail})")


def window_mean(curve: dict[int, float], end: int, window: int) -> float | None:
    """Mean of a logged curve (step -> value) over steps (end − window, end]."""
    vals = [v for s, v in curve.items() if end - window < s <= end]
    return sum(vals) / len(vals) if vals else None


def first_step_reaching(curve: dict[int, float], target: float, window: int) -> int | None:
    """§4.4's question on the training loss: the first logged step s ≥ ``window`` at which the curve's
    mean over (s − window, s] is at most ``target``; None when it never is."""
    return next((s for s in sorted(curve) if s >= window and window_mean(curve, s, window) <= target), None)
