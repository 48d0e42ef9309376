"""The allocation problem: layers of experts, a budget, constraints and an objective.

A :class:`Problem` is everything a solver needs and nothing model-specific. Build one from a
scores file with :func:`build_problem`, or directly from arrays (tests, experiments).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from solvers.constraints import (
    Budget,
    Constraint,
    LayerRule,
    MinKept,
    RoutingGroups,
    parse_min_kept,
)
from solvers.errors import UserError
from solvers.objectives import Objective, parse_objective
from solvers.scores import Scores
from solvers.sizes import Footprint, deployed


@dataclass
class Layer:
    """One MoE layer: per-expert importance (comparable across layers) and bytes, plus optional
    pairwise similarity and a cost curve ``cost_curve[n]`` = error of keeping n experts."""

    index: int
    importance: np.ndarray
    expert_bytes: np.ndarray
    top_k: int = 1
    similarity: np.ndarray | None = None
    cost_curve: np.ndarray | None = None

    def __post_init__(self):
        self.importance = np.asarray(self.importance, dtype=np.float64)
        n = self.importance.shape[0]
        self.expert_bytes = np.asarray(self.expert_bytes, dtype=np.int64)
        if self.importance.shape != (n,) or self.expert_bytes.shape != (n,):
            raise UserError(
                f"layer {self.index}: importance and expert_bytes must both have shape ({n},)"
            )
        if not np.all(np.isfinite(self.importance)) or np.any(self.importance < 0):
            raise UserError(f"layer {self.index}: importance must be finite and >= 0")
        if np.any(self.expert_bytes < 0):
            raise UserError(f"layer {self.index}: expert_bytes must be >= 0 (sizes in bytes)")
        if self.similarity is not None:
            sim = np.array(self.similarity, dtype=np.float64)
            if sim.shape != (n, n) or not np.all(np.isfinite(sim)):
                raise UserError(
                    f"layer {self.index}: similarity must be a finite ({n}, {n}) matrix"
                )
            sim = (sim + sim.T) / 2.0  # symmetric by definition; absorbs round-off
            np.fill_diagonal(sim, 1.0)
            self.similarity = sim
        if self.cost_curve is not None:
            self.cost_curve = np.asarray(self.cost_curve, dtype=np.float64)
            if self.cost_curve.shape != (n + 1,) or not np.all(np.isfinite(self.cost_curve)):
                raise UserError(f"layer {self.index}: cost_curve must be a finite ({n + 1},) array")

    @property
    def num_experts(self) -> int:
        return int(self.importance.shape[0])

    @property
    def uniform_bytes(self) -> int | None:
        b = self.expert_bytes
        return int(b[0]) if b.size and np.all(b == b[0]) else None


@dataclass
class Problem:
    layers: list[Layer]
    budget: Budget
    objective: Objective
    constraints: list[Constraint] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # identity of the model (written into plans)
    provenance: dict = field(default_factory=dict)
    # bytes besides the routed experts, as deployed (solvers.sizes); None: experts only
    footprint: Footprint | None = None

    def __post_init__(self):
        self.layers = sorted(self.layers, key=lambda layer: layer.index)
        if not self.layers:
            raise UserError("the problem has no MoE layers")
        if len({layer.index for layer in self.layers}) != len(self.layers):
            raise UserError("layer indices must be distinct")
        if isinstance(self.objective, str):
            self.objective = parse_objective(self.objective)
        self.objective.validate(self)
        for c in self.all_constraints:
            c.validate(self)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def all_constraints(self) -> list[Constraint]:
        return [self.budget, *self.constraints]

    @cached_property
    def position(self) -> dict[int, int]:
        return {layer.index: p for p, layer in enumerate(self.layers)}

    @property
    def layer_indices(self) -> list[int]:
        return [layer.index for layer in self.layers]

    @property
    def total_experts(self) -> int:
        return sum(layer.num_experts for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return int(sum(int(layer.expert_bytes.sum()) for layer in self.layers))

    @property
    def uniform_bytes_per_layer(self) -> bool:
        return all(layer.uniform_bytes is not None for layer in self.layers)

    def needs_expert_level(self) -> bool:
        """True when some constraint depends on *which* experts are kept, not only how many."""
        return any(c.needs_expert_level(self) for c in self.all_constraints)

    # -- per-layer view of the constraints ------------------------------------------------------
    def layer_rules(self) -> list[LayerRule]:
        if "_rules" not in self.__dict__:
            rules = []
            for p, layer in enumerate(self.layers):
                rule = LayerRule.free(layer.num_experts)
                for c in self.all_constraints:
                    extra = c.layer_rule(self, p)
                    if extra is None:
                        continue
                    rule.keep |= extra.keep
                    rule.remove |= extra.remove
                    if extra.groups is not None:
                        if rule.groups is not None and not np.array_equal(
                            rule.groups, extra.groups
                        ):
                            raise UserError(
                                f"layer {layer.index}: two different routing-group partitions"
                            )
                        rule.groups = extra.groups
                rules.append(rule)
            self.__dict__["_rules"] = rules
        return self.__dict__["_rules"]

    def allowed_counts(self) -> list[np.ndarray]:
        """Per layer, bool (N+1,): kept counts every per-layer constraint and rule allows."""
        if "_allowed" not in self.__dict__:
            out = []
            for p, (layer, rule) in enumerate(zip(self.layers, self.layer_rules())):
                ok = rule.feasible_counts()
                for c in self.all_constraints:
                    c.restrict_counts(self, p, ok)
                out.append(ok)
            self.__dict__["_allowed"] = out
        return self.__dict__["_allowed"]

    def describe(self) -> dict:
        return {
            "objective": self.objective.describe(),
            "budget": self.budget.describe(self),
            "constraints": [c.describe(self) for c in self.constraints],
        }


def build_problem(
    scores: Scores,
    budget: Budget | str | float,
    objective: Objective | str = "additive",
    constraints: list[Constraint] | tuple = (),
    criterion: str = "reap_mass",
    normalize: str = "none",
    similarity: str | None = "auto",
    similarity_top_m: int | None = None,
    min_kept: int | None | str = "top_k",
    routing_groups: bool | str = "auto",
    curves: str = "auto",
    deploy_dtype: str | None = None,
) -> Problem:
    """Turn calibration scores into a Problem.

    * importance = ``scores.importance(criterion, normalize)``;
    * ``similarity``: the kind to use (``"auto"``: ``cka`` if present, else the first stored kind,
      else none); ``similarity_top_m`` keeps only each expert's m most similar neighbours
      (symmetrised, the rest set to 0) - smaller integer programs for large N;
    * ``min_kept``: ``"top_k"`` (default: each layer keeps at least its router's top_k),
      an integer, or None for no floor;
    * ``routing_groups``: ``"auto"`` adds DeepSeek-V3 group rules when the model has n_group > 1;
    * ``curves``: each layer's cost curve (the curves objective): ``"nll"`` the measured NLL
      curves, ``"output"`` the calibration's block-output error, ``"auto"`` nll when every layer
      has one, else output;
    * ``deploy_dtype``: size the model as deployed in this format (``bf16``, ``fp8``, ...;
      solvers.sizes) instead of as the scores record it.
    """
    if not isinstance(budget, Budget):
        budget = Budget.parse(str(budget))
    if isinstance(objective, str):
        objective = parse_objective(objective)
    min_kept = parse_min_kept(min_kept)
    if similarity_top_m is not None and (not isinstance(similarity_top_m, (int, np.integer))
                                         or similarity_top_m < 1):
        raise UserError(f"--similarity-top-m {similarity_top_m!r} must be a whole number >= 1 "
                        "(neighbours kept per expert); leave it unset to keep all")
    curve_of, curve_source = _curve_source(scores, curves)
    sizes = deployed(scores, deploy_dtype)
    kinds = sorted({k for layer in scores.layers.values() for k in layer.similarity})
    if similarity == "auto":
        similarity = "cka" if "cka" in kinds else (kinds[0] if kinds else None)
    layers = _layers(scores, scores.importance(criterion, normalize), similarity, similarity_top_m,
                     sizes, curve_of)
    extra: list[Constraint] = []
    if min_kept is not None and not any(isinstance(c, MinKept) for c in constraints):
        extra.append(MinKept(None if min_kept == "top_k" else min_kept))
    n_group = scores.model.n_group or 1
    if (routing_groups is True or (routing_groups == "auto" and n_group > 1)) and not any(
        isinstance(c, RoutingGroups) for c in constraints
    ):
        extra.append(RoutingGroups(n_group, scores.model.topk_group or n_group))
    return Problem(
        layers=layers,
        budget=budget,
        objective=objective,
        constraints=[*extra, *constraints],
        model=scores.model.to_json(),
        provenance={
            "scores_fingerprint": scores.fingerprint(),
            "criterion": criterion,
            "normalize": normalize,
            "similarity": similarity,
            "similarity_top_m": similarity_top_m,
            "curves": curve_source,
            "deploy_dtype": sizes.dtype,
            "sizes": sizes.note,
        },
        footprint=sizes.footprint,
    )


def _layers(scores: Scores, importance, similarity, similarity_top_m, sizes, curve_of) -> list[Layer]:
    """One Layer per MoE layer of the scores: importance, deployed sizes, similarity, curve."""
    sims = scores.similarity(similarity) if similarity else {}
    layers = []
    for idx, ls in sorted(scores.layers.items()):
        sim = sims.get(idx)
        if sim is not None and similarity_top_m:
            sim = sparsify(sim, similarity_top_m)
        layers.append(Layer(index=idx, importance=importance[idx], expert_bytes=sizes.expert_bytes[idx],
                            top_k=scores.model.top_k.get(idx, 1), similarity=sim, cost_curve=curve_of(ls)))
    return layers


def _curve_source(scores: Scores, curves: str):
    """(layer scores -> cost curve, the source's name) for the `curves` setting."""
    has_nll = all(ls.nll_curve is not None for ls in scores.layers.values())
    if curves not in ("auto", "nll", "output"):
        raise UserError(f"--curves {curves!r}: choose auto, nll or output")
    if curves == "nll" and not has_nll:
        raise UserError("--curves nll needs measured NLL curves in the scores file for every layer; "
                        "`grape run` (with its search) or grape.searching.sensitivity.measure_nll_curves stores "
                        "them, or use --curves output")
    if curves == "nll" or (curves == "auto" and has_nll):
        return (lambda ls: ls.nll_curve), "nll"
    return (lambda ls: ls.cost_curve), "output"


def sparsify(sim: np.ndarray, m: int) -> np.ndarray:
    """Keep each row's m largest off-diagonal entries (union with the transpose); zero the rest."""
    n = sim.shape[0]
    if m >= n - 1:
        return sim
    off = sim.copy()
    np.fill_diagonal(off, -np.inf)
    top = np.argpartition(-off, m - 1, axis=1)[:, :m]
    keep = np.zeros_like(sim, dtype=bool)
    keep[np.repeat(np.arange(n), m), top.ravel()] = True
    keep |= keep.T
    np.fill_diagonal(keep, True)
    return np.where(keep, sim, 0.0)
