"""The statistics `rlhf monitor` reports, in plain Python (scipy is not a dependency of this project):

    quantile(xs, q)           linear interpolation between order statistics (numpy's default, "type 7")
    ks_2samp(a, b)            two-sample Kolmogorov-Smirnov: D = sup_x |F_a(x) - F_b(x)| and its asymptotic p-value
    mean_shift(a, b)          z of mean(b) - mean(a) over its standard error (Welch), and the one-sided p-values
    proportion_shift(a, b)    the same for two rates (a, b are (successes, trials); pooled standard error)

The KS p-value is the asymptotic (Kolmogorov) one: p = Q(sqrt(n m / (n + m)) * D), with
Q(l) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 l^2), the limit distribution of sqrt(n) D (scipy's `kstwobign`). It is
conservative when values tie (lengths in tokens do), and rough below some 20 values a side: the monitor tests only
windows of at least `min_rows` answers. A mean or rate shift uses the normal approximation, fine from a few dozen
values a side.
"""

from __future__ import annotations

import math
from bisect import bisect_right


def quantile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of xs by linear interpolation between order statistics; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def kolmogorov_sf(lam: float) -> float:
    """Q(lam) = P(K > lam) for the Kolmogorov distribution, K the limit of sqrt(n) D_n."""
    if lam <= 0:
        return 1.0
    if lam < 1.18:  # the alternating series converges slowly here; Jacobi's theta form converges fast
        s = sum(math.exp(-((2 * k - 1) ** 2) * math.pi ** 2 / (8 * lam * lam)) for k in range(1, 8))
        return max(0.0, min(1.0, 1.0 - math.sqrt(2 * math.pi) / lam * s))
    s = sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return max(0.0, min(1.0, 2 * s))


def ks_2samp(a: list[float], b: list[float]) -> tuple[float, float]:
    """(D, asymptotic p-value) of the two-sample KS test; the empirical CDFs are compared at every observed value,
    so ties are counted right."""
    if not a or not b:
        raise ValueError("ks_2samp needs values on both sides")
    sa, sb = sorted(a), sorted(b)
    n, m = len(sa), len(sb)
    d = max(abs(bisect_right(sa, x) / n - bisect_right(sb, x) / m) for x in set(sa) | set(sb))
    return d, kolmogorov_sf(math.sqrt(n * m / (n + m)) * d)


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def _shift(diff: float, se: float) -> dict:
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return {"diff": diff, "z": z, "p_up": normal_sf(z), "p_down": normal_sf(-z)}


def mean_shift(a: list[float], b: list[float]) -> dict | None:
    """From a to b: the difference of means, its z (Welch's standard error) and the one-sided p-values of a rise
    (p_up) and of a fall (p_down); None without two values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    return {"from": ma, "to": mb, **_shift(mb - ma, math.sqrt(va / len(a) + vb / len(b)))}


def proportion_shift(a: tuple[int, int], b: tuple[int, int]) -> dict | None:
    """From rate a to rate b, each (successes, trials): the difference, its z (pooled standard error) and the
    one-sided p-values; None when a side has no trials."""
    (xa, na), (xb, nb) = a, b
    if na == 0 or nb == 0:
        return None
    pooled = (xa + xb) / (na + nb)
    se = math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    return {"from": xa / na, "to": xb / nb, **_shift(xb / nb - xa / na, se)}
