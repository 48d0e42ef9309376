"""The independent plan checker: re-verifies a plan against its problem from scratch.

It uses only the plan file's contents, each constraint's ``check`` method and each objective
term's ``layer_values``; no solver, model or curve code. Every solver's plan passes through it
before :func:`solvers.solve.solve` returns, and ``grape solve`` can re-check a saved plan.
"""

from __future__ import annotations

import math

from solvers.errors import PlanError
from solvers.plan import STATUSES, Plan


def check_plan(plan: Plan, problem, rel_tol: float = 1e-6) -> list[str]:
    """Every way `plan` breaks `problem`, in words ([] when it is valid)."""
    out: list[str] = []
    indices = problem.layer_indices
    if sorted(plan.kept) != indices:
        out.append(
            f"plan covers layers {sorted(plan.kept)[:8]}..., the problem has {indices[:8]}..."
        )
        return out
    for layer in problem.layers:
        kept, removed = plan.kept[layer.index], plan.removed[layer.index]
        if sorted(kept + removed) != list(range(layer.num_experts)):
            out.append(
                f"layer {layer.index}: kept and removed experts do not partition 0..{layer.num_experts - 1}"
            )
    if out:
        return out
    for c in problem.all_constraints:
        out.extend(c.check(plan, problem))
    out.extend(_placement_problems(plan, problem))
    if plan.status not in STATUSES:
        out.append(f"status {plan.status!r} is not one of {STATUSES}")
    value = problem.objective.value(plan, problem)
    scale = max(1.0, abs(value))
    if (
        not (isinstance(plan.objective, float) and math.isfinite(plan.objective))
        or abs(plan.objective - value) > rel_tol * scale
    ):
        out.append(f"objective {plan.objective!r} does not match the recomputed {value!r}")
    out.extend(_bound_problems(plan, value, rel_tol))
    for layer_index, mapping in plan.merge_map.items():
        if layer_index not in plan.kept:
            out.append(f"merge map names layer {layer_index}, which the plan does not have")
            continue
        kept, removed = set(plan.kept[layer_index]), set(plan.removed[layer_index])
        if not kept:  # nothing left to merge into
            if mapping:
                out.append(f"layer {layer_index}: keeps no expert but has a merge map")
            continue
        if set(mapping) != removed:
            out.append(f"layer {layer_index}: the merge map must map exactly the removed experts")
        bad = {a: b for a, b in mapping.items() if b not in kept}
        if bad:
            out.append(
                f"layer {layer_index}: merge map targets {sorted(set(bad.values()))[:5]} are not kept"
            )
    return out


def _placement_problems(plan: Plan, problem) -> list[str]:
    """A recorded per-device table must be the first memory cap's, recomputed from the scores'
    sizes and the plan's kept experts, and every device must be within its cap. (A table from
    before the breakdown - no experts/other/kv entries - is compared on what it has.)"""
    from solvers.constraints.base import kept_mask
    from solvers.constraints.memory import MemoryCap
    from solvers.constraints.units import over_cap

    if not plan.placement:
        return []
    caps = [c for c in problem.constraints if isinstance(c, MemoryCap)]
    if not caps:
        return ["plan records a device placement, but the problem has no memory cap"]
    masks = [kept_mask(plan, problem, p) for p in range(len(problem.layers))]
    expected = caps[0].placement_table(problem, masks)
    out = []
    recorded = [{k: r[k] for k in row if k in r} for r, row in zip(plan.placement, expected)]
    if len(plan.placement) != len(expected) or recorded != [
        {k: row[k] for k in r} for r, row in zip(recorded, expected)
    ]:
        out.append("the plan's device placement does not match the one recomputed from the scores")
    out.extend(
        f"device {r['device']} holds {r['bytes']} bytes, above its cap {r['cap']}"
        for r in expected if over_cap(r["bytes"], r["cap"])
    )
    return out


def _bound_problems(plan: Plan, value: float, rel_tol: float) -> list[str]:
    """The bound, gap and status, judged from the recomputed objective alone: the plan's own
    ``gap`` field is recomputed, never trusted."""
    out = []
    scale = max(1.0, abs(value))
    bound = plan.bound
    if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound)):
        return [f"lower bound {bound!r} is not a finite number"]
    if bound is not None and bound > value + rel_tol * scale:
        out.append(f"lower bound {bound!r} exceeds the plan's objective {value!r}")
    gap = None if bound is None else max(0.0, (value - bound) / max(abs(value), 1e-12))
    if plan.status == "optimal" and (gap is None or gap > rel_tol):
        shown = "no bound" if gap is None else f"a gap of {gap:.3g}"
        out.append(f"status optimal needs a bound within {rel_tol:g} of the objective, but it has {shown}")
    if (plan.gap is None) != (gap is None) or (
        gap is not None and abs(plan.gap - gap) > rel_tol * max(1.0, gap)
    ):
        out.append(f"gap {plan.gap!r} does not match (objective - bound) / |objective| = {gap!r}")
    return out


def assert_valid(plan: Plan, problem) -> None:
    problems = check_plan(plan, problem)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        raise PlanError(f"plan from solver {plan.solver!r} breaks the problem: {shown}")
