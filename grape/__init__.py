"""GRAPE: global expert pruning for sparse Mixture-of-Experts language models.

The Python API (grape/api.py), one verb per stage, each imported on first use so that
`import grape` stays free of torch:

    scores  = grape.calibrate(model, data, grape.CalibrationConfig(...), tokenizer=tok)
    problem = grape.build_problem(scores, grape.SolveConfig(budget=0.25, objective="redundancy"))
    plan    = grape.solve(problem, grape.SolveConfig(solver="exact"))
    found   = grape.search(model, scores, ["val.jsonl"], grape.SolveConfig(budget=0.25),
                           grape.SearchConfig(), tokenizer=tok)        # found.best.plan
    model   = grape.apply(model, plan, grape.ApplyConfig("remove"))
    path    = grape.save(model, "pruned/", plan=plan, tokenizer=tok)
    model   = grape.load("pruned/")
    result  = grape.evaluate(model, tok, data, grape.EvalConfig(...))
    run     = grape.run_pipeline(grape.RunConfig(model="moe/", out="runs/x", data=["corpus/"]))

The work is done in modules named for their stage, not for the verb (grape.calibration.calibrate,
grape.pruning.apply, grape.evaluation.perplexity, grape.searching.stage, ...), so `grape.calibrate` and
`grape.search` are always the functions.
"""

import importlib

__version__ = "0.1.0"

# the public names, imported on first use so `import grape` stays free of torch
_LAZY = {
    # API verbs (grape/api.py)
    "calibrate": "grape.api",
    "apply": "grape.api",
    "evaluate": "grape.api",
    "solve": "grape.api",
    "search": "grape.api",
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
    "CalibrationConfig": "grape.calibration.calibrate",
    "EvalConfig": "grape.evaluation.perplexity",
    "EvalResult": "grape.evaluation.perplexity",
    "ApplyConfig": "grape.pruning.apply",
    "SearchConfig": "grape.searching.config",
    "SearchResult": "grape.searching.config",
    "Scores": "solvers.scores",
    "Plan": "solvers.plan",
    "UserError": "solvers.errors",
    # lower-level entry points
    "apply_plan": "grape.pruning.apply",
    "save_pruned": "grape.pruning.checkpoint",
    "load_pruned": "grape.pruning.checkpoint",
    "get_adapter": "grape.models.adapters",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grape' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
