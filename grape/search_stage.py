"""The search stage: model + scores + budget (or a plan) + held-out text -> plan.json, search.json.

    held_out = held_out_from_files(files, tokenizer, sequence_length(scores, config), config)
    found = run_search(model, scores, SolveConfig(budget=0.25), held_out, config, out=Path("runs/x"))

The held-out text is split by document (grape.data_split): the search measures on one set and
makes its final choice on another (`grape run` without --search-data holds both out of the
calibration text).

`grape run` (grape.pipeline), `grape search` (grape/commands/search.py) and the Python API
(`grape.search`) all call :func:`run_search` with a :class:`~grape.search_config.SearchConfig`,
so the same inputs give the same plan whichever way the stage is called. The algorithm itself is
grape.loss_search.
"""

from __future__ import annotations

import json
from pathlib import Path

from grape.errors import DataError
from grape.search_config import SearchConfig, SearchResult
from solvers.errors import UserError
from solvers.plan import Plan
from solvers.spec import SolveConfig

CACHE_FILE = "search.cache.json"  # every measurement, as it is made (an interrupted search resumes)
RESULT_FILE = "search.json"  # every candidate with its role and measured NLL


def search_tokens(files, tokenizer, seq_len: int, samples: int, spread: int = 64):
    """`samples` windows of `seq_len` tokens from each file, stacked: every file (a domain)
    weighs the same, as in the evaluation's mean over domains. The quality study's fixed search
    windows (the method study); the stage itself splits by document (held_out_from_files).

    Windows are packed as the evaluation packs them (documents joined with EOS) and taken
    evenly spaced over the file's first `spread` x samples x seq_len tokens, so they sample
    many documents: consecutive windows from the first few documents judge plans by those
    documents alone, and on the test bed that reversed which criterion looked better."""
    import torch

    from grape.evaluation import load_documents, pack_windows, spread_windows, token_stream

    rows = []
    for source in files:
        texts = [t for ts in load_documents([str(source)]).values() for t in ts]
        stream, _ = token_stream(tokenizer, texts, spread * samples * seq_len)
        windows = [w[:seq_len] for w in pack_windows(stream, seq_len) if len(w) == seq_len + 1]
        if not windows:
            raise DataError(f"--search-data {source}: fewer than {seq_len + 1} tokens of text; give "
                            "a larger file or a shorter --seq-len")
        rows += spread_windows(windows, samples)
    return torch.tensor(rows, dtype=torch.long)


def sequence_length(scores, config: SearchConfig) -> int:
    """Tokens per search sequence: the config's, else the calibration's (the scores record it)."""
    if config.seq_len is not None:
        return config.seq_len
    recorded = scores.calibration.get("seq_len")
    if not isinstance(recorded, int) or recorded < 2:
        raise UserError("the scores file does not record its calibration sequence length; give "
                        "--search-seq-len (SearchConfig.seq_len)")
    return recorded


def targets(config: SearchConfig, calibration_tokens: int = 0):
    """The token targets of the held-out split (grape.data_split.Targets) for `config`."""
    from grape.data_split import Targets

    return Targets(config.tokens, config.confirm_tokens if config.confirm else 0, calibration_tokens,
                   config.held_out_share)


def held_out_from_files(files, tokenizer, seq_len: int, config: SearchConfig):
    """Search and confirmation windows of `seq_len` tokens from --search-data files, split by
    document, each file's domain weighing the same (grape.data_split.split_files)."""
    from grape.data_split import split_files

    return split_files(files, tokenizer, targets(config), seq_len=seq_len, seed=config.seed)


def held_out_from_ids(ids, confirm_ids=None):
    """Held-out windows from ready input ids (each row its own document)."""
    import numpy as np

    from grape.data_split import HeldOut, Windows

    def wrap(t):
        return None if t is None else Windows(t, np.arange(t.shape[0]), ())

    return HeldOut(wrap(ids), wrap(confirm_ids), source="input ids")


def run_search(model, scores, solve: SolveConfig, held_out, config: SearchConfig,
               out: Path | None = None, plan: Plan | None = None) -> SearchResult:
    """The stage: the loss-verified search (grape.loss_search.search) on `held_out`
    (grape.data_split.HeldOut) from `plan` or the configured solver's; with `out`, it resumes
    from and records into out/search.cache.json and writes out/plan.json, out/search.json and,
    when it measured NLL curves, out/scores.npz (the scores with them, so that `grape solve
    --objective curves` plans on measured costs)."""
    from grape.loss_search import search

    cache = Path(out) / CACHE_FILE if out is not None else None
    confirm = held_out.confirm
    found = search(model, scores, solve, held_out.search.ids, config, cache=cache,
                   confirm_ids=confirm.ids if confirm is not None else None, plan=plan,
                   groups=held_out.search.groups, confirm_groups=confirm.groups if confirm is not None else None)
    found.notes[:0] = list(held_out.notes)
    found.held_out = held_out.record()
    _stamp(found)
    if out is not None:
        write_outputs(found, scores, Path(out))
    return found


def _stamp(found: SearchResult) -> None:
    """Record in the chosen plan how the search chose it (plan.json carries it)."""
    best = found.best.plan
    best.provenance = {**best.provenance, "search": {
        "chosen": found.best.name, "role": found.best.role.value, "passes": found.passes,
        "tokens_measured": found.tokens_measured, "computed_passes": round(found.computed_passes, 2),
        "nll": found.best.nll, "unpruned_nll": found.unpruned_nll,
        "versus_best_uniform": found.versus_uniform}}


def write_outputs(found: SearchResult, scores, out: Path) -> None:
    from grape.sensitivity import with_nll_curves
    from solvers._io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if found.nll_curves is not None:  # measured once: `grape solve --scores` can reuse them
        with_nll_curves(scores, found.nll_curves).save(out / "scores.npz")
    found.best.plan.save(out / "plan.json")
    atomic_write_text(out / RESULT_FILE, json.dumps(found.to_json(), indent=2) + "\n")


def describe(found: SearchResult) -> str:
    """The lines `grape run` and `grape search` print when the search is done."""
    line = (f"search: chose {found.best.name} ({found.best.role.value}; search NLL {found.best.nll:.4f}, "
            f"unpruned {found.unpruned_nll:.4f}) after {found.passes} passes ({found.computed_passes:.1f} "
            "computed, the rest reused layers or cached measurements)"
            + (f" and {len(found.confirmed)} confirmation passes" if found.confirmed else "")
            + f" ({found.tokens_measured:,} tokens), {found.seconds:.0f} s")
    versus = found.versus_uniform
    if versus is not None and versus["best_uniform"] != found.best.name:
        line += (f"\n    against the best uniform plan ({versus['best_uniform']}) on the {versus['on']} "
                 f"tokens: {versus['difference']:+.4f} +- {versus['se']:.4f} nats/token (SE by "
                 f"document, {versus['documents']} documents)")
    return line + "".join(f"\n    note: {n}" for n in found.notes if n.startswith(("held out", "confirmation on", "calibration:")))


__all__ = ["CACHE_FILE", "RESULT_FILE", "describe", "held_out_from_files", "held_out_from_ids", "run_search",
           "search_tokens", "sequence_length", "targets", "write_outputs"]
