"""The search stage's types: its configuration, the roles of its candidates, and its result.

:class:`SearchConfig` holds every option of the loss-verified search with its default, once:
`grape search` and `grape run` generate their search flags from its fields (grape.flags), and
the Python API (`grape.search`, `grape.RunConfig(search=...)`) takes it as it is. The algorithm
is in grape.searching.algorithm, the stage (tokens from files, files written) in grape.searching.stage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from grape.flags import comma_list, flag
from grape.searching.prefix import DEFAULT_MAX_BYTES
from grape.searching.sensitivity import DEFAULT_FRACTIONS, NllCurves
from solvers.errors import UserError
from solvers.plan import Plan


@dataclass(frozen=True)
class SearchConfig:
    """How much to spend on measuring plans. One pass = one forward over the search tokens."""

    max_passes: int = field(default=200, metadata=flag(
        "forward passes the search may spend (each measures one plan on the held-out search "
        "tokens, the unpruned reference included); unset: 100 on the test bed, else 200",
        name="search_passes", unset=True))
    # held-out tokens, by document (grape.data.split): without --search-data, whole documents of
    # the calibration text; with it, of those files (each domain weighing the same)
    tokens: int = field(default=16384, metadata=flag(
        "search tokens per pass (whole held-out documents cut into windows of --search-seq-len)",
        name="search_tokens"))
    seq_len: int | None = field(default=None, metadata=flag(
        "tokens per search sequence; unset: the calibration's sequence length (grape run: its "
        "--seq-len; grape search: the one the scores file records)", name="search_seq_len", type=int))
    confirm_tokens: int = field(default=65536, metadata=flag(
        "tokens of other held-out documents on which the finalists (every uniform seed, the "
        "search's choice and its runners-up) are measured again and the final choice is made",
        name="confirm_tokens"))
    held_out_share: float = field(default=0.5, metadata=flag(
        "at most this share of a calibration text too short for every target is held out for the "
        "search and its confirmation (the rest calibrates)", name="held_out_share", type=float))
    # below either minimum the confirmation cannot tell plans apart reliably: the result is then
    # the best uniform plan (a notice says so), never a non-uniform plan adopted on noise
    min_confirm_tokens: int = field(default=16384, metadata=flag(
        "fewest confirmation tokens on which a non-uniform plan may be adopted",
        name="min_confirm_tokens"))
    min_confirm_documents: int = field(default=8, metadata=flag(
        "fewest confirmation documents on which a non-uniform plan may be adopted (the standard "
        "errors are by document)", name="min_confirm_documents"))
    # uniform seeds and within-layer orders
    criteria: tuple[str, ...] = field(
        default=("reconstruction", "reap_mass", "frequency", "reap", "ean"), metadata=flag(
            "criteria whose uniform plans are seeds and whose within-layer orders are tried (those "
            "the scores file lacks are skipped with a note)", name="search_criteria", items=True))
    # integer-program seeds besides the configured one
    objectives: tuple[str, ...] = field(default=("additive", "curves"), metadata=flag(
        "objectives whose exact plans are seeds besides the configured one", name="search_objectives",
        items=True))
    nll_curves: bool = field(default=True, metadata=flag(
        "skip measuring per-layer NLL curves (one pass per layer and depth; done when they fit in "
        "half the passes and the scores lack them)", name="search_curves", negate=True))
    confirm: bool = field(default=True, metadata=flag(
        "skip the final choice on the confirmation tokens (the search's own choice stands, chosen "
        "on the tokens it selected on)", name="search_confirm", negate=True))
    # besides every uniform seed and the choice, the best other candidates on the search tokens
    # are confirmed too: a real gain that the small search sample showed by less than the margin
    # gets a second, larger hearing (the margin rule still decides, so uniform stays the floor)
    runners_up: int = 2
    curve_fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # depths at which each layer is measured
    moves_per_round: int = 8  # level switches measured per round of the local search
    # a candidate replaces the incumbent only when its NLL is lower by this many paired standard
    # errors (over search sequences): many comparisons on few tokens otherwise pick noise
    margin_se: float = field(default=2.0, metadata=flag(
        "a candidate replaces the incumbent only when lower by this many paired standard errors",
        name="search_margin", type=float))
    batch_size: int = 8  # search sequences per forward
    # memory for the decoder-layer inputs kept so that a plan sharing its first layers with one
    # measured before runs only the layers after them (grape.searching.prefix; 0: full passes only)
    reuse_bytes: int = DEFAULT_MAX_BYTES
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.criteria, str):
            set_(self, "criteria", comma_list(self.criteria))
        if isinstance(self.objectives, str):
            set_(self, "objectives", comma_list(self.objectives))
        for name, flag_name in (("max_passes", "--search-passes"), ("tokens", "--search-tokens"),
                                ("moves_per_round", "moves_per_round"), ("batch_size", "batch_size")):
            if getattr(self, name) < 1:
                raise UserError(f"search {name} ({flag_name}) must be at least 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"--search-seq-len {self.seq_len} must be at least 2 (tokens per sequence)")
        if self.confirm_tokens < 0 or self.min_confirm_tokens < 0 or self.min_confirm_documents < 0:
            raise UserError("--confirm-tokens, --min-confirm-tokens and --min-confirm-documents must be "
                            f">= 0, got {self.confirm_tokens}, {self.min_confirm_tokens}, {self.min_confirm_documents}")
        if not 0 < self.held_out_share <= 1:
            raise UserError(f"--held-out-share {self.held_out_share} must lie in (0, 1]")
        if not self.criteria:
            raise UserError("--search-criteria needs at least one criterion (e.g. reap_mass)")
        if self.runners_up < 0:
            raise UserError(f"search runners_up must be >= 0, got {self.runners_up}")
        if self.margin_se < 0:
            raise UserError(f"--search-margin {self.margin_se} must be >= 0 (standard errors)")
        if not all(0 < f < 1 for f in self.curve_fractions):
            raise UserError("search curve_fractions must lie strictly between 0 and 1")

    def check_names(self) -> None:
        """Refuse unknown criteria and objectives before any model is loaded."""
        from solvers.objectives import parse_objective
        from solvers.scores import CRITERIA

        for name in self.criteria:
            if name not in CRITERIA:
                raise UserError(f"--search-criteria: unknown criterion {name!r}; choose from "
                                f"{', '.join(sorted(CRITERIA))}")
        for name in self.objectives:
            parse_objective(name)


class Role(enum.Enum):
    """Why a candidate was measured. The "never worse than uniform" rule reads the role (never
    the display name): the best UNIFORM seed is the incumbent every other candidate must beat."""

    UNIFORM = "uniform seed"  # the same count removed in every layer, under one criterion
    SOLVER = "solver plan"  # the configured solver's plan (or the plan the caller gave)
    OBJECTIVE = "objective seed"  # the exact program on another objective
    CURVES = "curves seed"  # the exact program on the measured NLL curves
    CRITERION = "criterion order"  # the incumbent's counts under another criterion's order
    MOVE = "move"  # a level switch: experts of the budget moved between two layers
    LAYER_CRITERION = "layer criterion"  # one layer's experts under another criterion's order


@dataclass
class Candidate:
    name: str  # for people: tables, progress, search.json
    plan: Plan
    nll: float  # mean NLL per predicted search token (nats)
    per_sequence: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # mean NLL of each
    role: Role = field(default=Role.MOVE, kw_only=True)
    criterion: str | None = field(default=None, kw_only=True)  # a uniform seed's criterion
    # the document of each sequence: the unit of the standard errors (None: each its own)
    groups: np.ndarray | None = field(default=None, kw_only=True, repr=False)

    def difference(self, other: Candidate) -> tuple[float, float]:
        """(mean NLL of self minus other's, its standard error by document) on the same tokens."""
        from grape.evaluation.stats import mean_and_se

        return mean_and_se(self.per_sequence - other.per_sequence, self.groups)

    def beats(self, other: Candidate, margin_se: float) -> bool:
        """Lower NLL than `other` by more than `margin_se` paired standard errors (by document)."""
        diff, se = self.difference(other)
        return diff < -margin_se * se and self.nll < other.nll


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    unpruned_nll: float
    passes: int
    tokens_per_pass: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    nll_curves: NllCurves | None = None  # measured on the search tokens (store with with_nll_curves)
    reused: int = 0  # measurements read back from the cache instead of measured
    confirmed: list[dict] = field(default_factory=list)  # finalists' NLL on the confirmation tokens
    confirm_tokens: int = 0  # tokens per confirmation pass
    # the choice against the best uniform plan where the choice was made (confirmation tokens
    # when there were any): {"best_uniform", "difference", "se", "tokens", "documents", "on"}
    versus_uniform: dict | None = None
    held_out: dict | None = None  # which documents the search and confirmation used
    stability: dict | None = None  # grape.searching.stability's record, when measured
    # the final choice made again on repaired plans (grape.run_repair.judge_repaired), when made
    repaired: dict | None = None
    # decoder layers actually computed over the search tokens, in full passes (prefix reuse makes
    # it fewer than `passes`; measurements read from the cache compute nothing)
    computed_passes: float = 0.0
    # how the plans were measured: the loaded model, or layer by layer from the shards
    # (grape.searching.sequential; then also why, and on which device)
    mode: dict = field(default_factory=lambda: {"mode": "whole"})

    @property
    def tokens_measured(self) -> int:
        """Every token of every forward pass: search passes plus confirmation passes."""
        return self.passes * self.tokens_per_pass + len(self.confirmed) * self.confirm_tokens

    def table(self) -> str:
        rows = ["| candidate | role | mean NLL | increase |", "|---|---|---:|---:|"]
        for c in sorted(self.candidates, key=lambda c: c.nll):
            mark = " **(chosen)**" if c is self.best else ""
            rows.append(f"| {c.name}{mark} | {c.role.value} | {c.nll:.4f} | {c.nll - self.unpruned_nll:+.4f} |")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"chosen": self.best.name, "chosen_role": self.best.role.value,
                "unpruned_nll": self.unpruned_nll, "passes": self.passes,
                "tokens_per_pass": self.tokens_per_pass, "seconds": self.seconds, "notes": self.notes,
                "reused_from_cache": self.reused, "confirmed": self.confirmed,
                "confirm_tokens": self.confirm_tokens, "tokens_measured": self.tokens_measured,
                "computed_passes": round(self.computed_passes, 2), "mode": self.mode,
                "versus_best_uniform": self.versus_uniform, "held_out": self.held_out,
                "stability": self.stability, "repaired_judgement": self.repaired,
                "nll_curves": self.nll_curves.to_json() if self.nll_curves else None,
                "candidates": [{"name": c.name, "role": c.role.value, "nll": c.nll,
                                "kept_per_layer": {str(k): v for k, v in c.plan.kept_counts().items()}}
                               for c in self.candidates]}


__all__ = ["Candidate", "Role", "SearchConfig", "SearchResult"]
