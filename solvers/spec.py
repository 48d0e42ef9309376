"""The problem specification: what to optimise, under which budget and constraints, by which solver.

:class:`SolveConfig` describes the allocation problem (budget, objective, how importance and
similarity are read from the scores, constraints) and the solver. It is torch-free and lives
here, beside the Problem it builds, so that the optimisation package can be used on its own
(``solvers.spec.build_problem(scores, SolveConfig(budget=0.5))``). It is

* the Python API's argument (``grape.solve(scores, SolveConfig(budget=0.5))``);
* the source of the command-line flags of ``grape solve``, ``grape compare``, ``grape search``
  and ``grape run`` (the field metadata below; ``grape.cli.problem.add_problem_arguments`` turns it
  into flags, so every verb accepts the same problem flags with the same validation);
* validated once, when it is built (cheap checks that need no scores: the budget's form, the
  objective's terms and weights, the per-layer floor, flag combinations);
* turned into a :class:`solvers.problem.Problem` by one builder, :func:`build_problem`, which
  builds the constraint objects once the scores (layer list, expert counts) are known;
* recorded in every plan and comparison (:meth:`SolveConfig.to_json`).

Registered constraints (plugins included) are named with ``NAME:key=value,...``
(:func:`parse_constraint_spec`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from solvers.errors import UserError


class BudgetError(UserError):
    """A budget outside what the model can give: below 0, all experts, a fraction above 1."""


# each field's command-line description: its help text and the --help group it is listed under
FLAG_GROUPS = {"what": "what to optimise", "how": "how to solve", "cons": "constraints"}


def _flag(help: str, group: str = "cons", metavar: str | None = None, **extra) -> dict:
    return {"help": help, "group": group, "metavar": metavar, **extra}


class _DefaultBudget(str):
    """The budget nobody gave ("0.25", as typed): with --fit it becomes `fit`, the fewest removals
    that fit; otherwise 0.25."""


DEFAULT_BUDGET = _DefaultBudget("0.25")


def is_default_budget(value: Any) -> bool:
    """Whether `value` is the budget nobody gave (a verb may then take it from elsewhere: a plan)."""
    return isinstance(value, _DefaultBudget)


@dataclass(frozen=True)
class SolveConfig:
    """How to turn scores into a plan. Every field but `solver` and `constraints` is also a
    command-line flag (``--time-limit`` for `time_limit`, ...). See docs/solvers.md."""

    budget: str | float | int = field(default=DEFAULT_BUDGET, metadata=_flag(
        "what to remove: a fraction of all routed experts (0.25), an expert count (64), free:SIZE "
        "(free at least SIZE bytes, e.g. free:40GB), keep:SIZE, or fit (the fewest removals that "
        "fit the pipeline memory caps); default 0.25, or fit with --fit", "what"))
    objective: str = field(default="additive", metadata=_flag(
        "terms (additive, redundancy, coverage, curves, or a plugin's), optionally weighted and "
        "summed, e.g. redundancy+0.5*additive (docs/solvers.md)", "what"))
    solver: str = "exact"  # a name from solvers.registry.SOLVERS; each verb has its own flag
    time_limit: float = field(default=60.0, metadata=_flag(
        "seconds per solver run (exact: best plan, bound and gap at the limit)", "how", "SECONDS",
        type=float))
    criterion: str = field(default="reap_mass", metadata=_flag(
        "per-expert importance read from the scores", "what", choices="criteria"))
    normalize: str = field(default="none", metadata=_flag(
        "how each layer's importance is rescaled before layers meet", "what", choices="normalizations"))
    curves: str = field(default="auto", metadata=_flag(
        "layer curves for the curves objective: nll (measured end-to-end NLL increase, stored by "
        "the search or grape.searching.sensitivity), output (block-output error from calibration), or auto "
        "(nll when the scores have it for every layer, else output)", "what",
        choices=("auto", "nll", "output")))
    similarity: str | None = field(default="auto", metadata=_flag(
        "similarity kind for redundancy/coverage: auto (cka if present), cka, cosine, router, or "
        "none", "what"))
    similarity_top_m: int | None = field(default=None, metadata=_flag(
        "keep only each expert's M most similar neighbours (others 0)", "what", "M", type=int))
    coverage_candidates: int | None = field(default=16, metadata=_flag(
        "coverage integer program: candidate kept experts per expert", "what", "M", type=int))
    min_kept: int | str | None = field(default="top_k", metadata=_flag(
        "per-layer minimum kept: top_k (the router's k), a number, or none"))
    routing_groups: bool | str = field(default="auto", metadata=_flag(
        "DeepSeek-V3 group routing rules (auto: when the model has n_group > 1)",
        choices=("auto", "on", "off")))
    max_removed_fraction: float | None = field(default=None, metadata=_flag(
        "remove at most this fraction of any layer", metavar="F", type=float))
    uniform: bool = field(default=False, metadata=_flag(
        "same kept count in every layer (loads in vanilla transformers and vLLM)"))
    multiple_of: int | None = field(default=None, metadata=_flag(
        "every layer keeps a multiple of G experts", metavar="G", type=int))
    must_keep: str | None = field(default=None, metadata=_flag(
        "experts to keep, 'LAYER:E1,E2;LAYER:E3'", metavar="SPEC"))
    must_remove: str | None = field(default=None, metadata=_flag(
        "experts to remove, same syntax as --must-keep", metavar="SPEC"))
    entropy_gamma: float | None = field(default=None, metadata=_flag(
        "GRAPE entropy guard: allocation entropy >= (1 - GAMMA) log L", metavar="GAMMA", type=float))
    memory_cap: str | None = field(default=None, metadata=_flag(
        "per-device memory cap (with --pipeline or --expert-parallel) on what a device holds: its "
        "kept routed experts and, as the scores record them, the other parts of its layers (and "
        "the KV cache with --max-seq-len); one SIZE for every device or one per device, e.g. "
        "80GB,80GB,40GB", metavar="SIZE"))
    fit: str | None = field(default=None, metadata=_flag(
        "fit on these GPUs: NxSIZE or NxGPU (2x80GB, 8xH100, 4x141GB); caps every device at its "
        "memory less --kv-reserve, placed as N pipeline stages (or --expert-parallel N)",
        metavar="SPEC"))
    kv_reserve: str | None = field(default=None, metadata=_flag(
        "with --fit: the part of each device kept free (activations, and the KV cache unless "
        "--max-seq-len counts it), e.g. 20%% or 0.2", metavar="F"))
    max_seq_len: int | None = field(default=None, metadata=_flag(
        "with --fit or --memory-cap: count the KV cache of --batch sequences of this many tokens "
        "on every device (from the attention shape the scores record; on top of --kv-reserve)",
        metavar="TOKENS", type=int))
    batch: int | None = field(default=None, metadata=_flag(
        "with --max-seq-len: sequences served at once (default 1)", metavar="B", type=int))
    deploy_dtype: str | None = field(default=None, metadata=_flag(
        "size the model as deployed in this format instead of as its checkpoint stores it: bf16, "
        "fp16, fp32, fp8 or mxfp4 (fp8/mxfp4 re-size the routed experts only); counts in byte "
        "budgets and memory caps", metavar="DTYPE"))
    pipeline: int | None = field(default=None, metadata=_flag(
        "placement for --memory-cap: D pipeline stages of contiguous layers", metavar="D", type=int))
    expert_parallel: int | None = field(default=None, metadata=_flag(
        "placement for --memory-cap: expert e on rank e*D//N in every layer", metavar="D", type=int))
    stages: str = field(default="even", metadata=_flag(
        "pipeline stage boundaries: even (the same number of MoE layers per device) or balanced "
        "(contiguous ranges chosen so the fullest device holds the least, counting every "
        "parameter and the embeddings/head where they sit)", choices=("even", "balanced")))
    constraint: tuple[str, ...] = field(default=(), metadata=_flag(
        "any registered constraint (plugins included) as NAME or NAME:key=value,key=value; "
        "repeatable", metavar="SPEC", action="append"))
    constraints: tuple = ()  # Python API: constraint objects added as they are

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "constraints", tuple(self.constraints))
        set_(self, "constraint", tuple(self.constraint or ()))
        set_(self, "routing_groups", _routing(self.routing_groups))
        if isinstance(self.budget, _DefaultBudget):  # none given: 0.25, or with --fit "fit"
            set_(self, "budget", "fit" if self.fit is not None else 0.25)
        if isinstance(self.similarity, str) and self.similarity.strip().lower() == "none":
            set_(self, "similarity", None)
        self.validate()

    def validate(self) -> None:
        """Every check that needs no scores; raises UserError naming the flag."""
        from solvers.constraints import Budget, parse_caps, parse_min_kept
        from solvers.constraints.fit import parse_fit, parse_reserve
        from solvers.objectives import parse_objective
        from solvers.sizes import parse_deploy_dtype

        if not (isinstance(self.time_limit, (int, float)) and math.isfinite(self.time_limit)
                and self.time_limit > 0):
            raise UserError(f"time_limit (--time-limit) {self.time_limit!r} must be a positive number "
                            "of seconds")
        check_budget(self.budget)
        Budget.parse(str(self.budget))
        parse_objective(self.objective)
        parse_min_kept(self.min_kept)
        for name in ("similarity_top_m", "coverage_candidates", "multiple_of", "pipeline",
                     "expert_parallel", "max_seq_len", "batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} {value!r} must be a whole number >= 1")
        if self.kv_reserve is not None and self.fit is None:
            raise UserError("--kv-reserve only applies to --fit; give --fit SPEC too")
        if self.batch is not None and self.max_seq_len is None:
            raise UserError("--batch sizes the KV cache with --max-seq-len; give --max-seq-len TOKENS too")
        if self.max_seq_len is not None and self.fit is None and self.memory_cap is None:
            raise UserError("--max-seq-len counts the KV cache on each device; give --fit SPEC or "
                            "--memory-cap SIZE too")
        parse_deploy_dtype(self.deploy_dtype)
        if self.stages not in ("even", "balanced"):
            raise UserError(f"--stages {self.stages!r}: choose even or balanced")
        if self.stages == "balanced" and (self.expert_parallel is not None
                                          or (self.fit is None and self.pipeline is None)):
            raise UserError("--stages balanced places pipeline stages: give --fit SPEC or "
                            "--memory-cap SIZE --pipeline D (not --expert-parallel)")
        if self.fit is not None:
            if self.memory_cap is not None:
                raise UserError("give either --fit (caps from the GPUs) or --memory-cap, not both")
            gpus, _ = parse_fit(self.fit)
            parse_reserve(self.kv_reserve)
            for flag, value in (("--pipeline", self.pipeline), ("--expert-parallel", self.expert_parallel)):
                if value is not None and value != gpus:
                    raise UserError(f"--fit {self.fit} places {gpus} devices but {flag} says {value}")
            if self.pipeline is not None and self.expert_parallel is not None:
                raise UserError("--fit takes one placement: --pipeline or --expert-parallel")
        elif self.memory_cap is not None:
            parse_caps(self.memory_cap)
            if (self.pipeline is None) == (self.expert_parallel is None):
                raise UserError("--memory-cap needs exactly one placement: --pipeline D or "
                                "--expert-parallel D")
        elif self.pipeline is not None or self.expert_parallel is not None:
            raise UserError("--pipeline/--expert-parallel only place a --memory-cap; give "
                            "--memory-cap SIZE (or --fit SPEC) too")
        for spec in self.constraint:
            parse_constraint_spec(spec)

    # -- the constraint objects, once the scores are known --------------------------------------
    def constraint_objects(self, scores) -> list:
        """The constraints the fields describe (memory-cap placements need the model's layers)."""
        from solvers.constraints import (EntropyGuard, MaxRemovedFraction, MemoryCap, MultipleOf,
                                         MustKeep, MustRemove, Uniform, parse_caps)
        from solvers.constraints.fit import fit_caps

        out: list = []
        if self.max_removed_fraction is not None:
            out.append(MaxRemovedFraction(self.max_removed_fraction))
        if self.uniform:
            out.append(Uniform())
        if self.multiple_of is not None:
            out.append(MultipleOf(self.multiple_of))
        if self.must_keep:
            out.append(MustKeep.parse(self.must_keep))
        if self.must_remove:
            out.append(MustRemove.parse(self.must_remove))
        if self.entropy_gamma is not None:
            out.append(EntropyGuard(self.entropy_gamma))
        if self.memory_cap is not None or self.fit is not None:
            if self.fit is not None:
                devices, cap = fit_caps(self.fit, self.kv_reserve)
                pipeline = None if self.expert_parallel is not None else devices
            else:
                cap, pipeline = parse_caps(self.memory_cap), self.pipeline
            kv = {"max_seq_len": self.max_seq_len, "batch": self.batch or 1} if self.max_seq_len else None
            out.append(MemoryCap.pipeline(scores.model.moe_layers, pipeline, cap, kv,
                                          stages=self._balanced_stages(scores, pipeline))
                       if pipeline is not None else
                       MemoryCap.expert_parallel(scores.model.experts_per_layer, self.expert_parallel,
                                                 cap, kv))
        out.extend(parse_constraint_spec(spec) for spec in self.constraint)
        return [*out, *self.constraints]

    def _balanced_stages(self, scores, devices: int) -> list[list[int]] | None:
        """With --stages balanced: the contiguous MoE-layer ranges that minimise the fullest
        device's bytes at full size (solvers.constraints.memory.balanced_stages); else None."""
        if self.stages != "balanced":
            return None
        from solvers.constraints.memory import balanced_stages
        from solvers.sizes import deployed

        sizes = deployed(scores, self.deploy_dtype)
        layers = sorted(scores.model.moe_layers)
        weights = [float(np.sum(sizes.expert_bytes[i])) for i in layers]
        extra_first = extra_last = 0.0
        if sizes.footprint is not None:
            fp = sizes.footprint
            for i, layer in enumerate(layers):  # a decoder layer goes with the next MoE layer
                below = layers[i - 1] if i else -1
                weights[i] += sum(fp.layers.get(d, 0) for d in range(below + 1, layer + 1))
            weights[-1] += sum(fp.layers.get(d, 0) for d in range(layers[-1] + 1, fp.num_hidden_layers))
            extra_first, extra_last = float(fp.embed), float(fp.head + (fp.embed if fp.tied else 0))
        return balanced_stages(layers, devices, weights, extra_first, extra_last)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "constraints"}
        out["budget"] = str(self.budget)
        out["constraint"] = list(self.constraint)
        out["constraints"] = [c.to_json() for c in self.constraints]
        return out


def _routing(value: bool | str) -> bool | str:
    mapping = {"auto": "auto", "on": True, "off": False, True: True, False: False}
    if value not in mapping:
        raise UserError(f"--routing-groups {value!r}: choose auto, on or off")
    return mapping[value]


def check_budget(budget: str | float, total_experts: int | None = None) -> None:
    """Raise BudgetError when `budget` asks for a removal outside 0 .. total_experts - 1 (without
    the count: only its form and sign; byte budgets are checked against the sizes by the
    solver's feasibility check)."""
    total_experts = (1 << 62) if total_experts is None else total_experts
    text = str(budget).strip()
    if ":" in text or text.lower() == "fit":
        return
    try:
        number = float(text)
    except ValueError:
        raise BudgetError(f"budget {text!r} is not a fraction (0.25), an expert count (64), "
                          "free:SIZE or keep:SIZE") from None
    if not math.isfinite(number):
        raise BudgetError(f"budget {text!r} is not a finite number; give a fraction in [0, 1) or a "
                          f"count of experts to remove (0 .. {total_experts - 1})")
    if number < 0:
        raise BudgetError(f"budget {text!r} is out of range: give a fraction in [0, 1) or a "
                          f"count of experts to remove (0 .. {total_experts - 1})")
    if number < 1 or (number == 1 and "." in text):
        if number >= 1:
            raise BudgetError(f"budget {text!r} would remove every expert; give a fraction below 1 "
                              "(e.g. 0.25) or a count of experts to remove")
        return
    if number != int(number):
        raise BudgetError(f"budget {text!r} is out of range: a fraction must lie in [0, 1) and an "
                          "expert count must be a whole number")
    if int(number) >= total_experts:
        raise BudgetError(f"budget {text!r} removes {int(number)} experts, but the model has only "
                          f"{total_experts} routed experts; remove at most {total_experts - 1}, "
                          "or give a fraction such as 0.25")



# -- constraints named on the command line ------------------------------------------------------
def parse_constraint_spec(spec: str):
    """A registered constraint from ``NAME``, ``NAME:key=value,key=value`` or a JSON object
    ``{"name": NAME, key: value}``; values are read as the field's type (int, float, bool, str)."""
    from solvers.constraints import CONSTRAINTS, constraint_from_json

    text = str(spec).strip()
    data = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--constraint {spec!r} is not valid JSON ({exc.msg})") from None
        name = str(data.get("name", "")) if isinstance(data, dict) else ""
    else:
        name, _, rest = text.partition(":")
    cls = CONSTRAINTS.get(name.strip())
    if cls is None or name.strip() == "budget":
        known = ", ".join(sorted(n for n in CONSTRAINTS if n != "budget"))
        raise UserError(f"--constraint {spec!r}: unknown constraint {name!r}; choose from {known} "
                        "(or load a plugin with --plugin)")
    if data is not None:  # a recorded spec (Constraint.to_json): read as a plan's are read
        return constraint_from_json(data)
    raw = dict(_pair(item, spec) for item in rest.split(",") if item.strip())
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"--constraint {spec!r}: {cls.__name__} has no setting {unknown[0]!r}; it "
                        f"takes {', '.join(fields) or 'none'}")
    try:
        return cls(**{key: _typed(value, fields[key].type) for key, value in raw.items()})
    except (TypeError, ValueError) as exc:
        raise UserError(f"--constraint {spec!r}: {exc}") from None


def _pair(item: str, spec: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"--constraint {spec!r}: write NAME:key=value,key=value")
    return key.strip(), value.strip()


def _typed(value: Any, annotation: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = str(annotation)
    if "bool" in text:
        return value.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if kind.__name__ in text:
            try:
                return kind(value)
            except ValueError:
                continue
    return None if value.lower() == "none" and "None" in text else value



def build_problem(scores, config: SolveConfig | None = None, **overrides):
    """The :class:`solvers.problem.Problem` for `scores` (a Scores object) under `config`;
    keyword arguments override config fields (``build_problem(scores, budget=0.5)``)."""
    from solvers.objectives import parse_objective
    from solvers.problem import build_problem as _build

    config = replace(config or SolveConfig(), **overrides)
    check_budget(config.budget, sum(scores.model.experts_per_layer.values()))
    objective = parse_objective(config.objective)
    if config.coverage_candidates is not None:
        for _, term in objective.terms:
            if hasattr(term, "candidates"):
                term.candidates = int(config.coverage_candidates)
    return _build(
        scores,
        budget=str(config.budget),
        objective=objective,
        constraints=config.constraint_objects(scores),
        criterion=config.criterion,
        normalize=config.normalize,
        similarity=config.similarity,
        similarity_top_m=config.similarity_top_m,
        min_kept=config.min_kept,
        routing_groups=config.routing_groups,
        curves=config.curves,
        deploy_dtype=config.deploy_dtype,
    )


def plan_for(scores, config: SolveConfig | None = None, problem=None):
    """The checked Plan `config.solver` finds for `scores` under `config` (`problem`: the one
    :func:`build_problem` made from them, when the caller has it)."""
    from solvers.solve import solve

    config = config or SolveConfig()
    problem = problem if problem is not None else build_problem(scores, config)
    return solve(problem, solver=config.solver, time_limit=config.time_limit)


# the fields that are command-line flags (every field but `solver` and `constraints`)
PROBLEM_FLAGS = tuple(f.name for f in dataclasses.fields(SolveConfig) if f.metadata)

__all__ = [
    "DEFAULT_BUDGET",
    "FLAG_GROUPS",
    "PROBLEM_FLAGS",
    "BudgetError",
    "SolveConfig",
    "build_problem",
    "check_budget",
    "is_default_budget",
    "parse_constraint_spec",
    "plan_for",
]
