"""Standard errors that match how held-out tokens are drawn: by document.

Consecutive windows of one document are not independent samples: they share a topic, a style
and a vocabulary, so a plan that suits the document wins on all of its windows at once. The
plain standard error over windows then understates the noise (on the zoo by 1.3-2.9x), and a
search comparing dozens of plans under a 2-SE rule adopts noise. Here the unit is the document
(a cluster of windows): the cluster-robust standard error of a mean,

    SE^2 = G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2 / n^2,

which is the plain SE (up to n / (n - 1)) when every window is its own document, and grows with
the correlation inside documents. Every SE GRAPE reports or decides on comes from here: the
search's margin rule, search.json and the tables of measured quality.

    se = clustered_se(nll_a - nll_b, groups)        # groups[i]: document of window i
"""

from __future__ import annotations

import math

import numpy as np


def clustered_se(values, groups=None) -> float:
    """Standard error of the mean of `values` with the windows of one group (document) as one
    unit; `groups` None: every value its own unit. 0.0 for fewer than two units."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n < 2:
        return 0.0
    if groups is None:
        return float(x.std(ddof=1) / math.sqrt(n))
    g = np.asarray(groups).ravel()
    if g.size != n:
        raise ValueError(f"{n} values but {g.size} group labels")
    _, index = np.unique(g, return_inverse=True)
    units = int(index.max()) + 1
    if units < 2:
        return 0.0
    sums = np.bincount(index, weights=x - x.mean(), minlength=units)
    return float(math.sqrt(units / (units - 1) * float(np.sum(sums ** 2))) / n)


def mean_and_se(values, groups=None) -> tuple[float, float]:
    """(mean, clustered standard error) of `values`."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return float(x.mean()) if x.size else float("nan"), clustered_se(x, groups)


def domain_mean_se(per_domain: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> tuple[float, float]:
    """(mean over domains of each domain's mean, its SE): domains are independent, each weighs
    1/D, so the variances add with weight 1/D^2. `per_domain`: domain -> (values, groups)."""
    if not per_domain:
        return float("nan"), float("nan")
    means, variances = [], []
    for values, groups in per_domain.values():
        mean, se = mean_and_se(values, groups)
        means.append(mean)
        variances.append(se ** 2)
    count = len(means)
    return float(sum(means) / count), float(math.sqrt(sum(variances)) / count)


def count_units(groups) -> int:
    """How many distinct documents (units) the labels name."""
    return int(np.unique(np.asarray(groups).ravel()).size) if groups is not None else 0


__all__ = ["clustered_se", "count_units", "domain_mean_se", "mean_and_se"]
