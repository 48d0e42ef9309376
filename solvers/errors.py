"""Errors a user can fix. The command line prints their message, with no traceback, and exits 2.

Every message names the bad input and says what to do about it.
"""


class UserError(ValueError):
    """Base class: bad input, not a bug."""


class ScoresError(UserError):
    """A scores file that cannot be used: wrong format, NaN statistics, another model."""


class PlanError(UserError):
    """A plan file that cannot be used, or a plan that breaks a constraint."""


class InfeasibleError(UserError):
    """No plan satisfies the budget and constraints; the message names the conflict with numbers."""


class SolverError(UserError):
    """The chosen solver cannot handle this problem (e.g. a constraint it does not support) or
    found no plan within its time limit; the message names another solver or setting to use."""
