"""Certificates for heuristic per-layer curves: proven lower bounds at every kept count.

The exact solver knows the best *found* kept set of every layer and count; this module proves
how far from optimal it can be. A layer's bound at count n is a sum of parts, each a valid lower
bound for some of the objective's terms:

* ``quadratic`` - the terms that are quadratic in the keep vector (redundancy, with any additive
  term folded in): first-order convex bounds (:mod:`solvers.firstorder`) with the uniform shift
  mu = -lambda_min and, for small layers, a per-expert diagonal shift from the Shor SDP
  relaxation (tighter, and still valid at every count);
* ``coverage`` - Lagrangian bounds from the layer's facility-location LP
  (:meth:`~solvers.objectives.Coverage.lp_lower_bounds`);
* any other term - its own ``lower_bounds`` (exact for ``curves``).

Each evaluation at a count yields a bound at *every* count, tight near the evaluated one; the
count-level program over the summed arrays gives the global bound, and re-evaluating at the
counts that program picks tightens it (a cutting-plane loop driven by :mod:`solvers.exact`).
All work here is bounded by iterations and solves, never by the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solvers.firstorder import BISECTION_STEPS, QuadBatch, bound_curves, convexify

QUAD_ITERATIONS = 300  # FISTA iterations per evaluation (it stops earlier once tight)
QUAD_TOL = 1e-4  # relative distance of bound and value at the evaluated count that is enough
SDP_MAX_EXPERTS = 48  # the SDP shift is worth its cost only on small layers
BATCH_BYTES = 256 * 2**20  # memory of one stacked batch of quadratic forms


@dataclass
class LayerQuadratic:
    """One layer's quadratic part: x'Mx + c'x + k on binaries, with its convexifying shift u."""

    matrix: np.ndarray
    linear: np.ndarray
    const: float
    shift: np.ndarray | None = None  # u: M + diag(u) is positive semidefinite
    lam_max: float = 0.0  # largest eigenvalue of M + diag(u)
    version: int = 0  # 0: uniform shift mu; 1: SDP shift


def quadratic_terms(problem) -> list[tuple[float, object]]:
    """The weighted terms the quadratic part covers: all terms with a quadratic form, if one of
    them has a matrix (otherwise there is nothing for the convex bound to do)."""
    layer = problem.layers[0]
    forms = [(w, t, t.quadratic(layer)) for w, t in problem.objective.terms]
    if not any(q is not None and q.matrix is not None for _, _, q in forms):
        return []
    return [(w, t) for w, t, q in forms if q is not None]


def layer_quadratic(terms, layer) -> LayerQuadratic:
    n = layer.num_experts
    matrix, linear, const = np.zeros((n, n)), np.zeros(n), 0.0
    for w, t in terms:
        q = t.quadratic(layer)
        if q.matrix is not None:
            matrix += w * q.matrix
        linear += w * q.linear
        const += w * q.const
    return LayerQuadratic(matrix, linear, const)


@dataclass
class Certificate:
    """Per-layer, per-count lower bounds, improved by evaluations, pushed into the curves."""

    problem: object
    curves: list
    quad_terms: list = field(init=False)
    parts: dict = field(init=False)  # part name -> per layer (N+1,) lower bounds
    done: set = field(init=False, default_factory=set)  # (part, p, n, version) evaluated
    points: dict = field(init=False, default_factory=dict)  # (p, n) -> relaxed keep vector
    lp_points: dict = field(init=False, default_factory=dict)  # the same from coverage LPs
    _quad: dict = field(init=False, default_factory=dict)  # p -> LayerQuadratic
    _lps: dict = field(init=False, default_factory=dict)  # this solve's coverage LPs (warm starts)
    _warm: set = field(init=False, default_factory=set)  # (part, p) whose LP exists
    whole: dict = field(init=False, default_factory=dict)  # p -> whole-layer bounds by count
    _sdps: dict = field(init=False, default_factory=dict)  # compiled SDPs by layer rule
    programs: set = field(init=False, default_factory=set)  # (p, n) one-layer programs run
    program_seconds: float = field(init=False, default=0.0)  # their estimated cost so far

    def __post_init__(self):
        self.rules = self.problem.layer_rules()
        self.quad_terms = quadratic_terms(self.problem)
        quad_ids = {id(t) for _, t in self.quad_terms}
        layers = self.problem.layers
        self.parts = {}
        if self.quad_terms:
            self.parts["quadratic"] = [
                sum(w * t.lower_bounds(layer) for w, t in self.quad_terms) for layer in layers
            ]
        for i, (w, t) in enumerate(self.problem.objective.terms):
            if id(t) not in quad_ids:
                self.parts[f"{i}:{t.name}"] = [w * t.lower_bounds(layer) for layer in layers]
        self.push()

    # -- the arrays --------------------------------------------------------------------------
    def layer_bounds(self, p: int) -> np.ndarray:
        total = sum(part[p] for part in self.parts.values())
        return np.maximum(total, self.whole[p]) if p in self.whole else total

    def raise_whole(self, p: int, n: int, bound: float) -> None:
        """A bound on the whole layer objective at one count (a per-layer program's)."""
        row = self.whole.setdefault(p, np.full(self.problem.layers[p].num_experts + 1, -np.inf))
        row[n] = max(row[n], bound)
        self.push()

    def push(self) -> None:
        """Raise every heuristic curve's bound to the current arrays (exact curves stay exact)."""
        for p, curve in enumerate(self.curves):
            if not curve.exact:
                curve.bound = np.maximum(curve.bound, self.layer_bounds(p)[curve.counts])

    def _raise(self, part: str, p: int, values: np.ndarray) -> None:
        self.parts[part][p] = np.maximum(self.parts[part][p], values)

    # -- evaluations -------------------------------------------------------------------------
    def pending(self, wanted: dict[int, set[int]]) -> list[tuple[str, int, int]]:
        """(part, p, n) evaluations in `wanted` not yet done at the layer's current version."""
        out = []
        for p in sorted(wanted):
            if self.curves[p].exact:
                continue
            for n in sorted(wanted[p]):
                for part in self.parts:
                    key = (part, p, n, self._version(part, p))
                    if self._evaluable(part) and key not in self.done:
                        out.append((part, p, n))
        return out

    def _evaluable(self, part: str) -> bool:
        return part == "quadratic" or part.endswith(":coverage")

    def _version(self, part: str, p: int) -> int:
        return self._quad[p].version if part == "quadratic" and p in self._quad else 0

    def seconds(self, pending) -> float:
        """Estimated seconds of these evaluations (a size model, for scheduling only)."""
        total = 0.0
        for part, p, _ in pending:
            n = self.problem.layers[p].num_experts
            if part == "quadratic":  # a matrix-vector product and a bisection per iteration
                total += QUAD_ITERATIONS * (5e-10 * n * n + 2e-11 * n * BISECTION_STEPS)
            elif (part, p) in self._warm:  # the layer's LP again, from its last basis
                total += 0.002 + 1e-6 * n * 18
            else:  # an LP over n x (candidates + 2) variables, from scratch
                total += 0.005 + 5e-6 * n * 18
        return total

    def evaluate(self, pending) -> None:
        quad = [(p, n) for part, p, n in pending if part == "quadratic"]
        if quad:
            self._evaluate_quadratic(quad)
        for part, p, n in pending:
            if part != "quadratic":
                self._evaluate_coverage(part, p, n)
        self.push()

    def _evaluate_coverage(self, part: str, p: int, n: int) -> None:
        i = int(part.split(":")[0])
        w, term = self.problem.objective.terms[i]
        layer = self.problem.layers[p]
        relaxed: dict = {}
        bounds = term.lp_lower_bounds(layer, [n], self.rules[p], self._lps, relaxed)
        if n in relaxed:
            self.lp_points[(p, n)] = relaxed[n]
        self._warm.add((part, p))
        self._raise(part, p, w * bounds)
        self.done.add((part, p, n, 0))

    def quadratic_of(self, p: int) -> LayerQuadratic:
        if p not in self._quad:
            q = layer_quadratic(self.quad_terms, self.problem.layers[p])
            q.shift, q.lam_max = convexify(q.matrix)
            self._quad[p] = q
        return self._quad[p]

    def _evaluate_quadratic(self, pairs: list[tuple[int, int]]) -> None:
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for p, n in pairs:
            key = (self.problem.layers[p].num_experts, self.rules[p].num_groups)
            by_shape.setdefault(key, []).append((p, n))
        for (size, _), group in sorted(by_shape.items()):
            step = max(1, BATCH_BYTES // (8 * size * size))
            for a in range(0, len(group), step):
                self._quadratic_batch(group[a : a + step])

    def _quadratic_batch(self, pairs: list[tuple[int, int]]) -> None:
        forms = [self.quadratic_of(p) for p, _ in pairs]
        rules = [self.rules[p] for p, _ in pairs]
        g = rules[0].num_groups
        batch = QuadBatch(
            q=np.stack([f.matrix + np.diag(f.shift) for f in forms]),
            c=np.stack([f.linear - f.shift for f in forms]),
            const=np.array([f.const for f in forms]),
            lip=np.array([2.0 * max(f.lam_max, 1e-12) for f in forms]),
            lo=np.stack([r.keep.astype(float) for r in rules]),
            hi=np.stack([(~r.remove).astype(float) for r in rules]),
            labels=np.stack([r.labels() for r in rules]),
            targets=np.array([[n / g] * g for _, n in pairs], float),
        )
        start = np.stack([self._start(p, n, batch.lo[b]) for b, (p, n) in enumerate(pairs)])
        bounds, x = bound_curves(
            batch, _min_linear_rows(rules), QUAD_ITERATIONS, QUAD_TOL, start=start
        )
        for b, ((p, n), f) in enumerate(zip(pairs, forms)):
            self._raise("quadratic", p, bounds[b])
            self.points[(p, n)] = x[b]
            self.done.add(("quadratic", p, n, f.version))

    def _start(self, p: int, n: int, lo: np.ndarray) -> np.ndarray:
        """Warm start: the relaxed point of the nearest count already evaluated in this layer
        (the solution moves little with the count), else the middle of the box."""
        near = [m for (q, m) in self.points if q == p]
        if not near:
            return np.full(lo.shape, n / lo.size)
        m = min(near, key=lambda m: (abs(m - n), m))
        return self.points[(p, m)] + (n - m) / lo.size

    # -- the SDP shift ---------------------------------------------------------------------------
    def sdp_candidates(self, counts: np.ndarray) -> list[int]:
        """Layers small enough for the SDP shift, not shifted yet."""
        if not self.quad_terms:
            return []
        return [
            p
            for p, layer in enumerate(self.problem.layers)
            if not self.curves[p].exact
            and layer.num_experts <= SDP_MAX_EXPERTS
            and self.quadratic_of(p).version == 0
        ]

    @staticmethod
    def sdp_seconds(problem, positions) -> float:
        return sum(0.03 + 6e-8 * problem.layers[p].num_experts ** 4 for p in positions)

    def apply_sdp(self, positions, counts: np.ndarray) -> int:
        """Replace the uniform shift of each layer by the SDP's diagonal (made convex again if the
        solver's duals fall short); returns how many layers changed."""
        from solvers.sdp import sdp_shift

        changed = 0
        for p in positions:
            q = self.quadratic_of(p)
            u = sdp_shift(q.matrix, q.linear, int(counts[p]), self.rules[p], self._sdps)
            q.version = 1  # tried, whether or not it helped: never again
            if u is not None:
                q.shift, q.lam_max = convexify(q.matrix, u)
                changed += 1
        return changed


def _min_linear_rows(rules):
    """S_n(g) for every row of a batch: a vectorised sort for rule-free layers, the rule's own
    per-group sort otherwise."""
    free = np.array(
        [not (r.keep.any() or r.remove.any() or r.groups is not None) for r in rules], bool
    )

    def min_linear(g: np.ndarray) -> np.ndarray:
        out = np.empty((g.shape[0], g.shape[1] + 1))
        if free.any():
            sums = np.cumsum(np.sort(g[free], axis=1), axis=1)
            out[free] = np.concatenate([np.zeros((sums.shape[0], 1)), sums], axis=1)
        for b in np.flatnonzero(~free):
            out[b] = rules[b].min_linear(g[b])
        return out

    return min_linear
