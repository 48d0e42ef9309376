"""Model-side user errors; all derive from solvers.errors.UserError so the CLI treats them alike."""

from solvers.errors import InfeasibleError, PlanError, ScoresError, UserError


class ArchitectureError(UserError):
    """The model's architecture is not supported, or breaks a family rule (e.g. DeepSeek groups)."""


class DataError(UserError):
    """Calibration or evaluation data that cannot be read or is too short."""


class ShortTextError(DataError):
    """Text that runs out before the rows asked for are filled."""


__all__ = ["UserError", "ScoresError", "PlanError", "InfeasibleError", "ArchitectureError", "DataError", "ShortTextError"]
