"""dcdit.evaluation.metrics: the metric math against brute force, closed forms and torchmetrics
(a maintained library computing the same quantities independently; docs/evaluation.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.evaluation import metrics as M


def _spd(d, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _fd_reference(mu1, s1, mu2, s2):
    """Brute force: Tr sqrt(Σ1Σ2) from the eigenvalues of the (non-symmetric) product, which are
    real and non-negative for SPD Σ1, Σ2 (similar to Σ1^½ Σ2 Σ1^½)."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-8 and lam.real.min() > -1e-10
    tr = np.sqrt(np.clip(lam.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


# ------------------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("d,seed", [(1, 0), (5, 1), (24, 2)])
def test_frechet_matches_eigenvalue_bruteforce(d, seed):
    s1, s2 = _spd(d, seed), _spd(d, seed + 100)
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(3)
    v1, v2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_feature_sets_is_zero():
    feats = np.random.default_rng(4).normal(size=(300, 32)) * 3 + 1
    mu, sigma = M.feature_statistics(feats)
    mu2, sigma2 = M.feature_statistics(feats.copy())
    assert abs(M.frechet_distance(mu, sigma, mu2, sigma2)) < 1e-6
    # rank-deficient covariance (N < D): zero up to the sqrt(machine eps) error that the square roots
    # of the ~1e-14 round-off eigenvalues contribute (any method: sqrtm and eigh agree on this)
    mu, sigma = M.feature_statistics(feats[:10])
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_frechet_falls_back_when_sqrtm_returns_nan(monkeypatch):
    """A broken BLAS returning NaN from sqrtm (LightningDiT #97): eps retry, then the eigh path."""
    import scipy.linalg

    calls = []

    def broken(a, *args, **kw):
        calls.append(1)
        return np.full_like(a, np.nan)

    monkeypatch.setattr(scipy.linalg, "sqrtm", broken)
    s1, s2 = _spd(8, 5), _spd(8, 6)
    mu1, mu2 = np.zeros(8), np.ones(8)
    fd, info = M.frechet_distance(mu1, s1, mu2, s2, return_info=True)
    assert len(calls) == 2 and info["eps_added"] > 0 and "eigh" in info["method"]
    assert fd == pytest.approx(_fd_reference(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_raises_on_large_imaginary_part():
    s1 = np.diag([1.0, -1.0])  # not a covariance: sqrtm(Σ1Σ2) has an imaginary diagonal entry of 1
    with pytest.raises(ValueError, match="imaginary"):
        M.frechet_distance(np.zeros(2), s1, np.zeros(2), np.eye(2))


def test_frechet_rejects_nan_and_shape_mismatch():
    with pytest.raises(ValueError, match="NaN"):
        M.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))
    with pytest.raises(ValueError, match="shape"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------ Inception Score


def test_inception_score_closed_forms():
    K = 10
    onehot = np.eye(K)[np.repeat(np.arange(K), 7)]  # confident and uniform over classes
    assert M.inception_score(onehot, split_size=None)[0] == pytest.approx(K, rel=1e-12)
    row = np.random.default_rng(0).dirichlet(np.ones(K))
    same = np.tile(row, (50, 1))  # identical predictions: p(y|x) = p(y)
    assert M.inception_score(same, split_size=None)[0] == pytest.approx(1.0, abs=1e-12)
    # confident over only 4 of 10 classes, uniformly: IS = 4
    four = np.eye(K)[np.repeat([1, 3, 5, 7], 5)]
    assert M.inception_score(four, split_size=None)[0] == pytest.approx(4.0, rel=1e-12)


def test_inception_score_splits():
    K = 5
    probs = np.eye(K)[np.tile(np.arange(K), 20)]  # every split of 25 holds 5 of each class
    mean, std = M.inception_score(probs, split_size=25)
    assert mean == pytest.approx(K) and std == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="sum to 1"):
        M.inception_score(np.ones((4, 3)))


def test_inception_score_splits_are_consecutive():
    """ADM splits in order: 20 one-hot samples of class 0, then 20 of class 1, in splits of 20 -> every
    split holds one class, IS = 1 per split; a shuffled split (what torchmetrics does) would give ≈ 2."""
    probs = np.eye(2)[np.repeat([0, 1], 20)]
    assert M.inception_score(probs, split_size=20) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert M.inception_score(probs, split_size=None)[0] == pytest.approx(2.0, rel=1e-12)


# ------------------------------------------------------------------------------ precision / recall


def _pr_bruteforce(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(30, 5)) * 0.6 + 0.8
    got = M.precision_recall(real, fake, k=3, batch_size=7)
    p, r = _pr_bruteforce(real, fake, 3)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
    assert 0 < p < 1 and 0 < r < 1  # a non-trivial case


def test_precision_recall_extremes():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(25, 4))
    same = M.precision_recall(real, real.copy(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = M.precision_recall(real, real + 1000.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


# ------------------------------------------------------------------------------ class accuracy


def test_class_accuracy_against_a_loop():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 6, 200)  # class 6 of 7 never appears
    pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 7, 200))
    acc, per = M.class_accuracy(pred, y, num_classes=7)
    assert acc == pytest.approx(sum(int(p == t) for p, t in zip(pred, y)) / 200)
    for c in range(6):
        idx = [i for i in range(200) if y[i] == c]
        assert per[c] == pytest.approx(sum(int(pred[i] == c) for i in idx) / len(idx))
    assert per[6] is None
    with pytest.raises(ValueError, match="shape"):
        M.class_accuracy(pred[:5], y, num_classes=7)


# ------------------------------------------------------------------------------ torchmetrics as the reference


class _Identity(nn.Module):
    """torchmetrics' "feature network" here: the features themselves (so both sides see the same numbers)."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


@pytest.mark.parametrize("d,n", [(8, 200), (64, 1000)])
def test_frechet_distance_agrees_with_torchmetrics(d, n):
    """torchmetrics' FrechetInceptionDistance (its own running sums for μ, Σ and Tr sqrt from eig(Σ1Σ2))
    on the same features. Catches a wrong covariance normalisation, mean, or square root in
    feature_statistics / frechet_distance."""
    fid_cls = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    real = rng.normal(size=(n, d)) @ a + 0.3
    fake = rng.normal(size=(n, d)) @ (a + 0.1 * rng.normal(size=(d, d)) / np.sqrt(d))
    tm = fid_cls(feature=_Identity(d), normalize=True).set_dtype(torch.float64)
    tm.update(torch.from_numpy(real), real=True)
    tm.update(torch.from_numpy(fake), real=False)
    ours = M.frechet_distance(*M.feature_statistics(real), *M.feature_statistics(fake))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-9)
    assert ours > 0.1  # not a trivially equal pair


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics: "features in buffer", std of one split
def test_inception_score_agrees_with_torchmetrics_in_one_split():
    """torchmetrics' InceptionScore on logits = log p (softmax(log p) = p), one split: its splits
    are a random permutation, ours consecutive, so only the one-split value is the same quantity."""
    is_cls = pytest.importorskip("torchmetrics.image.inception").InceptionScore
    probs = np.random.default_rng(0).dirichlet(np.ones(10) * 0.3, size=500)
    tm = is_cls(feature=_Identity(10), splits=1)
    tm.update(torch.from_numpy(np.log(probs)))
    ours = M.inception_score(probs, split_size=None)[0]
    assert ours == pytest.approx(float(tm.compute()[0]), rel=1e-10)
    assert 1.5 < ours < 10  # between the degenerate values 1 and K


# ------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    """The bootstrap distribution of a mean of n draws is ≈ N(x̄, σ̂²/n) with σ̂² the plug-in (ddof 0)
    variance, so the 95% interval is x̄ ± 1.96·σ̂/√n. Catches a wrong quantile (90%: 16% narrower),
    resampling without replacement (a point) and resampling the wrong axis."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    lo, hi = M.bootstrap_interval(np.mean, x, num_resamples=4000, seed=0)
    half = 1.959964 * x.std() / np.sqrt(len(x))
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.05 * half)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.05)


def test_bootstrap_interval_of_an_accuracy_is_the_binomial_quantiles():
    """Resampling a 0/1 vector with k ones gives means distributed exactly Binomial(n, k/n) / n, so
    the interval's ends are that distribution's 2.5% and 97.5% quantiles (to one step, 1/n)."""
    from scipy import stats

    n, k = 200, 150
    x = np.r_[np.ones(k), np.zeros(n - k)]
    lo, hi = M.bootstrap_interval(np.mean, x, num_resamples=5000, seed=3)
    assert abs(lo - stats.binom.ppf(0.025, n, k / n) / n) <= 1 / n
    assert abs(hi - stats.binom.ppf(0.975, n, k / n) / n) <= 1 / n


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """200 repeated experiments on a known distribution (exponential, mean 1): the percentile interval
    must contain the true mean in about 95% of them (the percentile bootstrap undercovers a little at
    n = 60; binomial sd of the rate is 1.5%)."""
    rng = np.random.default_rng(7)
    hits = sum(lo <= 1.0 <= hi for lo, hi in
               (M.bootstrap_interval(np.mean, rng.exponential(1.0, 60), num_resamples=400, seed=s) for s in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_interval_resamples_the_arrays_jointly():
    """Predictions and labels are resampled with the same indices: a perfect classifier's accuracy
    stays exactly 1 in every resample (independent resampling would pair mismatched rows)."""
    y = np.arange(50) % 10
    assert M.bootstrap_interval(lambda p, t: (p == t).mean(), y.copy(), y, num_resamples=200) == (1.0, 1.0)


def test_bootstrap_interval_is_seeded_and_checks_its_inputs():
    x = np.random.default_rng(0).normal(size=30)
    assert M.bootstrap_interval(np.mean, x, seed=5) == M.bootstrap_interval(np.mean, x, seed=5)
    assert M.bootstrap_interval(np.mean, x, seed=5) != M.bootstrap_interval(np.mean, x, seed=6)
    with pytest.raises(ValueError, match="equal length"):
        M.bootstrap_interval(lambda a, b: 0.0, x, x[:-1])
    with pytest.raises(ValueError, match="confidence"):
        M.bootstrap_interval(np.mean, x, confidence=1.5)
