"""How the search measures plans: one interface, a whole-model and a layer-sequential evaluator.

An *evaluator* turns plans into per-sequence NLLs on fixed search tokens:

* :class:`WholeModelEvaluator` - the loaded model, one plan at a time, sharing decoder-layer
  inputs with the plans measured just before (grape.searching.prefix.PrefixReuse);
* grape.searching.sequential.StreamEvaluator - the checkpoint streamed one decoder layer at a time,
  a *generation* of plans at once (``batched``), for models that do not fit in memory.

The search (grape.searching.algorithm) decides one candidate at a time and talks only to the
:class:`Meter`, which counts passes, keeps the resume cache and asks the evaluator. Before each
generation - the seeds, the curve points, a round of level switches, ... - the search tells the
meter which plans it is about to ask for (:meth:`Meter.prefetch`); a batched evaluator measures
them in one walk over the layers, the whole-model one ignores the hint. A hint is only a hint:
each plan's NLL is the same to the bit whichever way it was measured, a plan the search asks for
without a hint is measured on demand, and a hinted plan the search never asks for costs compute
but no pass. So both evaluators give the same decisions and the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from grape.searching.prefix import PrefixReuse
from grape.searching.config import Candidate, Role, SearchConfig
from solvers.plan import Plan


class Evaluator(Protocol):
    batched: bool  # measures many plans in one go (then hints are worth following)
    layers_run: int  # decoder layers computed so far
    layer_count: int  # decoder layers of the model (a full pass)

    def measure(self, plans: Sequence[Plan | None]) -> list[np.ndarray]: ...


class WholeModelEvaluator:
    """The loaded model, a plan at a time, shared prefixes reused (grape.searching.prefix)."""

    batched = False

    def __init__(self, model: nn.Module, ids: torch.Tensor, config: SearchConfig):
        self.prefix = PrefixReuse(model, ids, config.batch_size, config.reuse_bytes)
        self.layer_count = len(self.prefix.layers)

    @property
    def layers_run(self) -> int:
        return self.prefix.layers_run

    def measure(self, plans: Sequence[Plan | None]) -> list[np.ndarray]:
        return [self.prefix.nll(plan) for plan in plans]


def evaluator_for(model, ids: torch.Tensor, config: SearchConfig) -> Evaluator:
    """A loaded model (nn.Module) is measured whole; an opened checkpoint
    (grape.searching.sequential.LayerStream) layer by layer."""
    if isinstance(model, nn.Module):
        return WholeModelEvaluator(model, ids, config)
    return model.evaluator(ids, config.batch_size)


def plan_key(plan: Plan | None) -> str:
    """The cache key of a plan (every layer's kept experts); the unpruned model's is fixed."""
    if plan is None:
        return "unpruned"
    return repr(tuple((layer, tuple(plan.kept[layer])) for layer in plan.layers))


def tokens_key(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:16]


def curve_plans(scores, criterion: str, fractions: Sequence[float], config=None) -> list[Plan]:
    """The single-layer plans grape.searching.sensitivity.measure_nll_curves measures, in its order (the
    search hints them as one generation)."""
    from grape.searching.sensitivity import single_layer_plan, uniform_plan
    from solvers.errors import UserError

    seen, plans = set(), []
    for fraction in fractions:
        try:
            plan = uniform_plan(scores, fraction, criterion, config)
        except UserError:  # measure_nll_curves skips this depth too
            continue
        for layer in plan.layers:
            point = (layer, len(plan.kept[layer]))
            if plan.removed[layer] and point not in seen:
                seen.add(point)
                plans.append(single_layer_plan(plan, layer))
    return plans


def cached_measurements(cache: Path, ids: torch.Tensor) -> dict[str, list[float]]:
    """plan key -> per-sequence NLL that the cache file `cache` holds for exactly these tokens
    ({} when it is missing, unreadable or of other tokens)."""
    try:
        stored = json.loads(Path(cache).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return stored.get("measured", {}) if stored.get("tokens") == tokens_key(ids) else {}


def confirmation_cache(cache: Path) -> Path:
    """Where the confirmation passes of a search whose cache is `cache` are recorded."""
    return Path(cache).with_suffix(".confirm.json")


class Meter:
    """Measures plans within the pass budget; with a cache file, reuses earlier measurements of
    the same plan on the same tokens (an interrupted search resumes) and records each new one."""

    def __init__(self, evaluator: Evaluator, ids: torch.Tensor, config: SearchConfig,
                 cache: Path | None, groups=None):
        from tqdm.auto import tqdm

        self.evaluator, self.ids, self.config, self.cache = evaluator, ids, config, cache
        self.groups = None if groups is None else np.asarray(groups)
        self.limit, self.used, self.reused = config.max_passes, 0, 0
        self.known: dict[str, list[float]] = {}
        self.ahead: dict[str, np.ndarray] = {}  # measured on a hint, not asked for yet
        self.tokens_key = tokens_key(ids)
        self.bar = tqdm(total=self.limit, desc="search", unit="pass", leave=False, disable=not config.progress)
        if cache is not None:
            self.known = cached_measurements(cache, ids)

    @property
    def left(self) -> int:
        return self.limit - self.used

    @property
    def computed_passes(self) -> float:
        """Decoder layers computed, in full passes (prefix sharing makes it fewer than passes;
        a generation's hinted plans never asked for make it more)."""
        return self.evaluator.layers_run / self.evaluator.layer_count

    def prefetch(self, plans: Sequence[Plan | None] | Callable[[], Sequence[Plan | None]]) -> None:
        """The plans the search is about to ask for, in order: a batched evaluator measures the
        first `left` of them that are neither cached nor measured ahead, together. `plans` may be
        a function, called only when the hint is followed."""
        if not self.evaluator.batched:
            return
        wanted: dict[str, Plan | None] = {}
        for plan in list(plans() if callable(plans) else plans)[: self.left]:
            key = plan_key(plan)
            if key not in self.known and key not in self.ahead:
                wanted.setdefault(key, plan)
        if wanted:
            self.ahead.update(zip(wanted, self.evaluator.measure(list(wanted.values()))))

    def ready(self, plan: Plan | None) -> bool:
        """Whether `plan` is measured already (cached, or ahead on a hint)."""
        key = plan_key(plan)
        return key in self.known or key in self.ahead

    def nll(self, name: str, plan: Plan | None) -> np.ndarray:
        """Per-sequence NLL of the model under `plan` (None: unpruned); one pass, or none when
        the cache has it."""
        key = plan_key(plan)
        if key in self.known:
            self.reused += 1
            out = np.asarray(self.known[key], dtype=np.float64)
        else:
            out = self.ahead.pop(key) if key in self.ahead else self.evaluator.measure([plan])[0]
            self.known[key] = [float(x) for x in out]
            self._save()
        self.used += 1
        self.bar.update(1)
        self.bar.set_postfix_str(f"{name}: NLL {float(out.mean()):.4f}"[:70])
        return out

    def candidate(self, name: str, plan: Plan, role: Role, criterion: str | None = None) -> Candidate:
        per_sequence = self.nll(name, plan)
        return Candidate(name, plan, float(per_sequence.mean()), per_sequence, role=role,
                         criterion=criterion, groups=self.groups)

    def _save(self) -> None:
        if self.cache is None:
            return
        from solvers._io import atomic_write_text

        self.cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cache, json.dumps({"tokens": self.tokens_key, "measured": self.known}))


__all__ = ["Evaluator", "Meter", "WholeModelEvaluator", "cached_measurements", "confirmation_cache", "curve_plans",
           "evaluator_for", "plan_key", "tokens_key"]
