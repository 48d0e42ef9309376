"""Objectives to minimise, one class per term, combinable with positive weights.

Every term is a sum over layers of a function of the layer's kept set S (``mask``):

* ``additive``   f(S) = sum_{e not in S} s_e                      (removed importance)
* ``redundancy`` f(S) = sum_{i != j in S} D_ij                    (GRAPE Eq. 4-5, D = similarity
  with a zero diagonal; ordered pairs, as in the paper)
* ``coverage``   f(S) = sum_e s_e (1 - max(0, max_{k in S} C_ek))  (facility location, C = similarity
  clipped to [0, 1] with a unit diagonal, so kept experts cost 0; each removed expert is
  assigned to its most similar kept expert, which is the merge map)
* ``curves``     f(S) = c_l(|S|)                                  (measured per-layer cost curves)

The contract and the registry (:data:`TERMS`, :func:`register_term`) are in
:mod:`~solvers.objectives.base`; the weighted sum, its parser and its spec reader in
:mod:`~solvers.objectives.combined`.
"""

from solvers.objectives.base import (
    TERMS,
    Quadratic,
    Term,
    TermState,
    need_similarity,
    register_term,
    term_from_json,
)
from solvers.objectives.combined import (
    CombinedState,
    Objective,
    objective_from_json,
    parse_objective,
)

# registration order is the order of TERMS, shown in messages and choice lists
from solvers.objectives.additive import Additive  # noqa: E402  isort: skip
from solvers.objectives.redundancy import Redundancy  # noqa: E402  isort: skip
from solvers.objectives.coverage import Coverage  # noqa: E402  isort: skip
from solvers.objectives.curves import Curves  # noqa: E402  isort: skip

_need_similarity = need_similarity  # the former single module's name

__all__ = [
    "TERMS",
    "Additive",
    "CombinedState",
    "Coverage",
    "Curves",
    "Objective",
    "Quadratic",
    "Redundancy",
    "Term",
    "TermState",
    "need_similarity",
    "objective_from_json",
    "parse_objective",
    "register_term",
    "term_from_json",
]
