"""Keep a repair only where it helps: the repaired model against the plainly pruned one, on
held-out documents neither the repair nor the search fitted on (issue 27).

The repair (grape.pruning.repair) is checked layer by layer on its own fitting tokens, so it is
never worse *there*; on other text it can be, a little, where removal already costs almost
nothing (the upcycled Mixtral of the test bed at 25-37.5%, docs/repair.md). `grape run` holds
documents out of its calibration text for the search's confirmation (grape.data.split); the
repair fits on the calibration documents only, so those confirmation documents are unseen by
both, and they decide:

    model, check, report = checked_apply(model, plan, method, repair_ids, confirm, reload, undo=True)
    check.line()   # "repair check on 44,032 held-out tokens (26 documents): NLL -0.0123 +- 0.0021 ..."

The plan's NLL without repair is measured on the unpruned model by routing around the removed
experts (grape.searching.sensitivity.masked, the same NLL as removal), the repaired model's after
the repair; the difference is paired by window, its standard error by document. A repair that
does not lower the mean NLL there is undone when `undo` (``--repair auto``): the repaired
model's weights are released (emptied in place, so two copies are never held at once)
and the model is loaded again and pruned without repair. An explicitly named repair is kept and
the measurement shown.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np

from grape.evaluation.stats import count_units, mean_and_se
from grape.pruning.apply import ApplyConfig
from grape.searching.sensitivity import masked, sequence_nll

BATCH_SIZE = 8  # held-out windows per forward (the search's batch)


@dataclass(frozen=True)
class RepairCheck:
    """The repaired model's NLL minus the unrepaired plan's on held-out windows (nats/token)."""

    tokens: int
    documents: int
    unrepaired: float  # mean NLL of the plan without repair
    repaired: float
    difference: float  # repaired - unrepaired, mean over windows
    se: float  # by document
    kept: bool  # the repair stays (it lowered the NLL, or it was asked for by name)

    def line(self) -> str:
        verdict = ("kept" if self.difference < 0 else "kept (asked for by name)") if self.kept else \
            "undone: the plan is applied without repair"
        return (f"repair check on {self.tokens:,} held-out tokens ({self.documents} documents): NLL "
                f"{self.difference:+.4f} +- {self.se:.4f} nats/token against no repair; {verdict}")

    def to_json(self) -> dict:
        return asdict(self)


def held_out_nll(model, ids, plan=None, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Per-window mean NLL of `model` on `ids`; with `plan`, the unpruned model routing only
    among the plan's kept experts (the NLL the plan has when removed)."""
    was_training = model.training
    model.eval()
    try:
        with masked(model, plan) if plan is not None else nullcontext():
            return sequence_nll(model, ids, batch_size)
    finally:
        model.train(was_training)


def judge(unrepaired: np.ndarray, repaired: np.ndarray, groups, undo: bool, tokens: int = 0) -> RepairCheck:
    """The check's verdict from the two per-window NLL arrays (same windows, same order, `tokens`
    tokens in all): the repair stays if it lowers the mean NLL, or if `undo` is False (named
    explicitly)."""
    unrepaired, repaired = np.asarray(unrepaired, np.float64), np.asarray(repaired, np.float64)
    if unrepaired.shape != repaired.shape or not unrepaired.size:
        raise ValueError(f"the repair check needs the same windows twice, got {unrepaired.shape} and "
                         f"{repaired.shape}")
    difference, se = mean_and_se(repaired - unrepaired, groups)
    documents = count_units(groups) if groups is not None else int(unrepaired.size)
    return RepairCheck(tokens=tokens, documents=documents, unrepaired=float(unrepaired.mean()),
                       repaired=float(repaired.mean()), difference=difference, se=se,
                       kept=difference < 0 or not undo)


def release_weights(model) -> None:
    """Free `model`'s parameters and buffers in place (each becomes an empty tensor on its
    device), whichever other references to the module remain; unlike ``model.to("meta")`` this
    also works on a model dispatched across devices by accelerate."""
    import torch

    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)


def checked_apply(model, plan, method: ApplyConfig, repair_ids, confirm, reload: Callable[[], object],
                  undo: bool, say=print, unrepaired: np.ndarray | None = None):
    """`plan` applied to the loaded, unpruned `model` with `method`'s repair, then checked on the
    held-out windows `confirm` (grape.data.split.Windows). Returns (the model to go on with, the
    RepairCheck, the repair's RepairReport): the same model, repaired; or, when the check undid
    the repair, a fresh one from `reload()` pruned without it (the repaired model's weights are
    released first: go on with the returned model, not `model`). Without windows: the repair
    unchecked, check None; without a repair: the plain apply, check and report None.
    `unrepaired`: the plan's per-window NLL on `confirm` when already measured (the search's
    confirmation of its finalists), else measured here."""
    from dataclasses import replace

    if method.repair == "none" or repair_ids is None or confirm is None:
        return model, None, apply_in_place(model, plan, method, repair_ids, say=say)
    before = unrepaired if unrepaired is not None else held_out_nll(model, confirm.ids, plan)
    report = apply_in_place(model, plan, method, repair_ids, say=say)
    check = judge(before, held_out_nll(model, confirm.ids), confirm.groups, undo, tokens=int(confirm.ids.numel()))
    say(check.line())
    if not check.kept:
        release_weights(model)  # before the fresh copy is read: never two copies at once
        model = reload()
        apply_in_place(model, plan, replace(method, repair="none"), None, say=say)
    return model, check, report


def apply_in_place(model, plan, config: ApplyConfig, repair_ids=None, say=print):
    """`plan` applied to a loaded model in place; with a repair (and its calibration rows,
    grape.pruning.stage.repair_tokens), pruned and repaired layer by layer (grape.pruning.repair).
    Returns the repair's RepairReport, or None without a repair."""
    from grape.pruning.repair import resolve_repair

    config, _ = resolve_repair(model.config.to_dict(), config)
    if repair_ids is None or config.repair == "none":
        from grape.pruning.apply import apply_plan

        apply_plan(model, plan, config)
        return None
    from grape.pruning.repair import prune_and_repair

    report = prune_and_repair(model, plan, config, repair_ids)
    say(report.line())
    return report


__all__ = ["BATCH_SIZE", "RepairCheck", "apply_in_place", "checked_apply", "held_out_nll", "judge",
           "release_weights"]
