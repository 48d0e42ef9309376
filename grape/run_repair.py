"""How `grape run` (grape.pipeline) repairs its plans: which repair, fitted on which rows, checked
on which held-out windows. Separate from the stage order so the pipeline module stays about the
order; the repair itself is grape.pruning.repair, its check grape.pruning.repair_check.

* :func:`repair_method` resolves --repair (auto: lstsq+experts where it can run, docs/repair.md);
* :func:`repair_for_run` picks the rows: with held-out confirmation documents, the run's own
  calibration rows, so those documents stay unseen by the repair and can judge it; otherwise
  the text (--repair-data, or --data read again), documents of it held out for the check
  under --repair auto;
* :func:`apply_checked` applies a plan with that repair and its check (undone only under auto).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

from grape.pruning.apply import AUTO_REPAIR_LAYERWISE, ApplyConfig
from grape.run_outputs import say as _indent


class RunRepair(NamedTuple):
    """The run's apply configuration with its repair resolved, the repair's rows (None: no
    repair), and the held-out windows that check it (None: no check; grape.pruning.repair_check)."""

    method: ApplyConfig
    ids: Any
    confirm: Any
    why: str | None = None  # why auto fell back to none here


def repair_method(config, scores, loaded: bool = True) -> tuple[ApplyConfig, str | None]:
    """The run's apply configuration and, when --repair auto fell back to none, why: merge
    weights from the scores; a repair fits on --repair-data, else --data. Where the run does not
    hold the model (`loaded`), auto repairs only a checkpoint that can be repaired from its shards."""
    from grape.models.files import read_config
    from grape.pruning.repair import resolve_repair
    from grape.pruning.stage import streams

    data = config.apply.repair_data or tuple(str(p) for p in config.data or ())
    method = replace(config.apply, merge_weights=scores if config.method == "merge" else None, repair_data=data)
    model_config = read_config(config.model)
    resolved, why = resolve_repair(model_config, method)
    if config.apply.repair == "auto" and resolved.repair != "none" and not loaded:
        # layer by layer from the shards: the lighter fit (grape.pruning.apply.AUTO_REPAIR_LAYERWISE)
        resolved = replace(resolved, repair=AUTO_REPAIR_LAYERWISE)
        if config.saves_checkpoint and not streams(config.model, model_config, resolved, config.dtype,
                                                   say=lambda line: None):
            resolved, why = replace(method, repair="none"), ("the model does not fit in memory here and "
                                                             "cannot be repaired layer by layer from its shards")
    return resolved, why


def repair_for_run(config, method: ApplyConfig, tokenizer, calibrated) -> RunRepair:
    """Where the repair fits and what checks it. With held-out confirmation documents, a repair
    that reads --data and a calibration run here (`calibrated`: grape.pipeline.Calibrated): on
    the calibration documents (the rows, and what else of those documents was read), so that
    the held-out documents are unseen by the repair and check it.
    Otherwise on the text (--repair-data, or --data read again): under --repair auto with the
    model in memory, documents of that text are held out for the check first (as `grape apply`
    does, grape.pruning.stage.auto_repair_split); else unchecked."""
    from grape.pruning.stage import auto_repair_rows, auto_repair_split, repair_rows, repair_tokens

    confirm = calibrated.held_out.confirm if calibrated.held_out is not None else None
    rows = calibrated.rows
    if confirm is not None and rows is not None and not config.apply.repair_data:
        # the calibration documents' whole stream where the split kept it (the rows are its start)
        ids = repair_rows(rows.stream if rows.stream is not None else rows.input_ids, config.model, method,
                          say=_indent)
        if ids is not None:
            return RunRepair(replace(method, repair_samples=int(ids.shape[0])), ids, confirm)
    if config.apply.repair == "auto" and calibrated.model is not None:
        # in memory: documents of the text held out to check the repair (as `grape apply` does)
        method, ids, confirm, why = auto_repair_split(config.model, method, tokenizer, say=_indent,
                                                      who="grape run")
        return RunRepair(method, ids, confirm, why)
    if config.apply.repair == "auto":  # as many rows as the text fills, read once
        method, ids, why = auto_repair_rows(config.model, method, tokenizer, say=_indent)
        return RunRepair(method, ids, None, why)
    ids = repair_tokens(config.model, method, tokenizer, say=_indent) if method.repair != "none" else None
    return RunRepair(method, ids, None)


def apply_checked(config, model, plan, repair: RunRepair, reload):
    """grape.pruning.repair_check.checked_apply as the run calls it: a repair that does not lower
    the held-out NLL is undone only under --repair auto. Returns (model to go on with, check)."""
    from grape.pruning.repair_check import checked_apply

    known = measured_on_confirmation(config.out, repair.confirm, plan) if repair.confirm is not None else None
    model, check, _ = checked_apply(model, plan, repair.method, repair.ids, repair.confirm, reload,
                                    undo=config.apply.repair == "auto", say=_indent, unrepaired=known)
    return model, check


def measured_on_confirmation(out, confirm, plan):
    """`plan`'s per-window NLL on the confirmation windows if the search measured it there (its
    finalists, recorded in OUT/search.cache.confirm.json for these very tokens), else None."""
    from pathlib import Path

    import numpy as np

    from grape.searching.meter import cached_measurements, confirmation_cache, plan_key
    from grape.searching.stage import CACHE_FILE

    values = cached_measurements(confirmation_cache(Path(out) / CACHE_FILE), confirm.ids).get(plan_key(plan))
    return np.asarray(values, dtype=np.float64) if values is not None and len(values) == confirm.ids.shape[0] else None


def judge_repaired(found, repair: RunRepair, rivals: int, margin_se: float, load, out, say=_indent):
    """The search's final choice looked at again on repaired plans (issue 27): the chosen plan and
    the `rivals` best other uniform finalists on the confirmation documents (plain NLL) are each
    repaired (a fresh model from `load()` per plan, released after: one copy at a time) and
    measured there again, each as the run keeps it (repaired, or plain where the repair does not
    lower its NLL). The choice is the incumbent: it already beat the uniform plans on these
    documents by the search's rule, so the best rival replaces it only when lower by `margin_se`
    paired standard errors (by document). Returns (the candidate to apply, the record for
    search.json), or None when there is no rival to compare with."""
    from grape.pruning.repair import prune_and_repair
    from grape.pruning.repair_check import held_out_nll, judge, release_weights
    from grape.searching.config import Role

    plain_nll = {r["name"]: r["nll"] for r in found.confirmed}
    chosen = found.best
    pool = sorted((c for c in found.candidates if c.role is Role.UNIFORM and c.name in plain_nll
                   and c is not chosen), key=lambda c: plain_nll[c.name])[:rivals]
    if not pool or repair.confirm is None or repair.ids is None:
        return None
    kept, rows = {}, []
    for candidate in (chosen, *pool):
        model = load()
        plain = measured_on_confirmation(out, repair.confirm, candidate.plan)
        if plain is None:
            plain = held_out_nll(model, repair.confirm.ids, candidate.plan)
        prune_and_repair(model, candidate.plan, repair.method, repair.ids)
        repaired = held_out_nll(model, repair.confirm.ids)
        release_weights(model)
        del model
        # what the run keeps: the repaired plan where its check keeps the repair, else the plain one
        check = judge(plain, repaired, repair.confirm.groups, undo=True)
        kept[candidate.name] = repaired if check.kept else plain
        rows.append({"name": candidate.name, "role": candidate.role.value, "plain": float(plain.mean()),
                     "repaired": float(repaired.mean()), "kept": float(kept[candidate.name].mean())})
        say(f"repaired judgement: {candidate.name}: confirmation NLL {rows[-1]['plain']:.4f} plain, "
            f"{rows[-1]['repaired']:.4f} repaired")
    by_name = {c.name: c for c in (chosen, *pool)}
    picked, rival, difference, se = repaired_pick(kept, chosen.name, [c.name for c in pool],
                                                  repair.confirm.groups, margin_se)
    pick = by_name[picked]
    record = {"plans": rows, "chosen": pick.name, "changed": pick is not chosen, "margin_se": margin_se,
              "best_rival": rival, "rival_minus_choice": difference, "se": se}
    say(f"repaired judgement: {pick.name}" + (f" replaces {chosen.name}" if pick is not chosen else " stays")
        + f" (repaired, {rival} minus the choice: {difference:+.4f} +- {se:.4f})")
    return pick, record


def repaired_pick(kept: dict, chosen: str, rivals: list[str], groups, margin_se: float):
    """The repaired judgement's rule on per-window NLLs `kept` (name -> array, each plan as the run
    keeps it): the best of `rivals` replaces `chosen` only when lower by `margin_se` paired
    standard errors (by document). Returns (the pick, the best rival, its NLL minus the
    choice's, that difference's SE)."""
    from grape.evaluation.stats import mean_and_se

    rival = min(rivals, key=lambda name: kept[name].mean())
    difference, se = mean_and_se(kept[rival] - kept[chosen], groups)
    return (rival if difference < 0 and difference < -margin_se * se else chosen), rival, difference, se


def judged_repaired(config, found, repair: RunRepair, model, plans: dict, scores, load_model):
    """:func:`judge_repaired` in the run: each plan it repairs is read afresh by `load_model`, the
    run's own copy `model` released before the first (never two in memory); a changed choice
    becomes plans["search"], plan.json and search.json. Returns the model to go on with (read
    again if it was released)."""
    from grape.pruning.repair_check import release_weights
    from grape.searching.stage import stamp_choice, write_outputs

    released = []

    def load():
        if not released:  # the run's copy goes before the first fresh one is read
            release_weights(model)
            released.append(True)
        return load_model()

    judged = judge_repaired(found, repair, config.repair_rivals, config.search.margin_se, load, config.out)
    if judged is not None:
        pick, found.repaired = judged
        if pick is not found.best:
            found.best = pick
            stamp_choice(found)
            plans["search"] = pick.plan
        write_outputs(found, scores, config.out)
    return load_model() if released else model


def repair_notes(repair: RunRepair, checks: dict, found) -> list[str]:
    """The report's lines on the run's repair: what was fitted on what, each plan's check, and the
    final choice judged repaired (grape.report.tables.RunReport notes)."""
    notes = []
    if repair.ids is not None and repair.method.repair != "none":
        rows, seq_len = (int(n) for n in repair.ids.shape)
        notes.append(f"repair `{repair.method.repair}` fitted on {rows} rows of {seq_len} tokens (docs/repair.md)")
    elif repair.why:
        notes.append(f"no repair: {repair.why}")
    if checks:
        first = next(iter(checks.values()))
        verdicts = ", ".join(f"{name} {'kept' if c.kept else 'undone'} ({c.difference:+.4f} +- {c.se:.4f})"
                             for name, c in checks.items())
        notes.append(f"repair checked on {first.tokens:,} held-out tokens ({first.documents} documents), NLL "
                     f"against no repair: {verdicts}")
    judged = found.repaired if found is not None else None
    if judged:
        verdict = "replaced the search's choice" if judged["changed"] else "kept the search's choice"
        notes.append(f"final choice judged repaired against {len(judged['plans']) - 1} uniform finalist(s): "
                     f"{judged['chosen']} ({verdict}; {judged['best_rival']} minus the choice "
                     f"{judged['rival_minus_choice']:+.4f} +- {judged['se']:.4f} nats/token)")
    return notes


__all__ = ["RunRepair", "apply_checked", "judge_repaired", "judged_repaired", "measured_on_confirmation",
           "repair_for_run", "repair_method", "repair_notes", "repaired_pick"]
