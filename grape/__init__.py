"""GRAPE: global expert pruning for sparse Mixture-of-Experts language models.

The Python API (grape/api.py), one verb per stage, each imported on first use so that
`import grape` stays free of torch:

    scores  = grape.calibrate(model, data, grape.CalibrationConfig(...), tokenizer=tok)
    problem = grape.build_problem(scores, grape.SolveConfig(budget=0.25, objective="redundancy"))
    plan    = grape.solve(problem, grape.SolveConfig(solver="exact"))
    model   = grape.apply(model, plan, grape.ApplyConfig("remove"))
    path    = grape.save(model, "pruned/", plan=plan, tokenizer=tok)
    model   = grape.load("pruned/")
    result  = grape.evaluate(model, tok, data, grape.EvalConfig(...))
    run     = grape.run_pipeline(grape.RunConfig(model="moe/", out="runs/x", data=["corpus/"]))

`grape.calibrate`, `grape.apply` and `grape.evaluate` are also the names of the submodules
that do the work; those three submodules are callable, and calling one runs the API verb
(`grape.apply(model, plan)` is `grape.api.apply(model, plan)`), while `from grape.apply import
apply_plan` keeps working as usual.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# the public names, imported on first use so `import grape` stays free of torch
_LAZY = {
    # API verbs (grape/api.py)
    "solve": "grape.api",
    "build_problem": "grape.api",
    "save": "grape.api",
    "load": "grape.api",
    "load_tokenizer": "grape.api",
    "load_scores": "grape.api",
    "load_plan": "grape.api",
    "check_budget": "grape.api",
    "SolveConfig": "grape.api",
    "BudgetError": "grape.api",
    # the whole pipeline (grape/pipeline.py)
    "RunConfig": "grape.pipeline",
    "run_pipeline": "grape.pipeline",
    # configuration objects and artifacts
    "CalibrationConfig": "grape.calibrate",
    "EvalConfig": "grape.evaluate",
    "EvalResult": "grape.evaluate",
    "ApplyConfig": "grape.apply",
    "Scores": "solvers.scores",
    "Plan": "solvers.plan",
    "UserError": "solvers.errors",
    # lower-level entry points
    "apply_plan": "grape.apply",
    "save_pruned": "grape.checkpoint",
    "load_pruned": "grape.checkpoint",
    "get_adapter": "grape.adapters",
}
# API verbs that share their name with the submodule implementing them
_VERB_MODULES = ("calibrate", "apply", "evaluate")


class _VerbModule(types.ModuleType):
    """A submodule that, called, runs the API verb of the same name (see the docstring above)."""

    def __call__(self, *args, **kwargs):
        from grape import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system binds each submodule on its package: make the verb ones callable
        if name in _VERB_MODULES and type(value) is types.ModuleType:
            value.__class__ = _VerbModule
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name in _VERB_MODULES:
        return importlib.import_module(f"grape.{name}")  # bound (and made callable) on import
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grape' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_VERB_MODULES))


sys.modules[__name__].__class__ = _Package
