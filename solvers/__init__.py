"""Pure optimisation for global expert pruning: numpy, scipy, OR-Tools, CVXPY. Never torch."""

from solvers.errors import InfeasibleError, PlanError, ScoresError, UserError
from solvers.plan import Plan
from solvers.scores import LayerScores, ModelIdentity, Scores

__all__ = [
    "Plan",
    "Scores",
    "LayerScores",
    "ModelIdentity",
    "UserError",
    "ScoresError",
    "PlanError",
    "InfeasibleError",
]
