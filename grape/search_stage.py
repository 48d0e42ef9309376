"""The search stage: model + scores + budget (or a plan) + search data -> plan.json, search.json.

    ids, confirm_ids = search_ids(files, tokenizer, sequence_length(scores, config), config)
    found = run_search(model, scores, SolveConfig(budget=0.25), ids, confirm_ids, config,
                       out=Path("runs/x"))

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
    weighs the same, as in the evaluation's mean over domains. What `--search-data` measures
    on (the quality benchmark too).

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


def search_ids(files, tokenizer, seq_len: int, config: SearchConfig):
    """(search ids, confirmation ids or None) from the search-data files: `config.samples` and
    `config.confirm_samples` windows of `seq_len` tokens per file (no confirmation when 0 or
    `config.confirm` is off). `seq_len`: :func:`sequence_length`, or the run's --seq-len."""
    ids = search_tokens(files, tokenizer, seq_len, config.samples)
    confirm = config.confirm and config.confirm_samples > 0
    return ids, search_tokens(files, tokenizer, seq_len, config.confirm_samples) if confirm else None


def run_search(model, scores, solve: SolveConfig, ids, confirm_ids, config: SearchConfig,
               out: Path | None = None, plan: Plan | None = None) -> SearchResult:
    """The stage: the loss-verified search (grape.loss_search.search) from `plan` or the
    configured solver's; with `out`, it resumes from and records into out/search.cache.json and
    writes out/plan.json, out/search.json and, when it measured NLL curves, out/scores.npz
    (the scores with them, so that `grape solve --objective curves` plans on measured costs)."""
    from grape.loss_search import search

    cache = Path(out) / CACHE_FILE if out is not None else None
    found = search(model, scores, solve, ids, config, cache=cache, confirm_ids=confirm_ids, plan=plan)
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
        "nll": found.best.nll, "unpruned_nll": found.unpruned_nll}}


def write_outputs(found: SearchResult, scores, out: Path) -> None:
    from grape.sensitivity import with_nll_curves
    from solvers._io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if found.nll_curves is not None:  # measured once: `grape solve --scores` can reuse them
        with_nll_curves(scores, found.nll_curves).save(out / "scores.npz")
    found.best.plan.save(out / "plan.json")
    atomic_write_text(out / RESULT_FILE, json.dumps(found.to_json(), indent=2) + "\n")


def describe(found: SearchResult) -> str:
    """The line `grape run` and `grape search` print when the search is done."""
    return (f"search: chose {found.best.name} ({found.best.role.value}; search NLL {found.best.nll:.4f}, "
            f"unpruned {found.unpruned_nll:.4f}) after {found.passes} passes ({found.computed_passes:.1f} "
            "computed, the rest reused layers or cached measurements)"
            + (f" and {len(found.confirmed)} confirmation passes" if found.confirmed else "")
            + f" ({found.tokens_measured:,} tokens), {found.seconds:.0f} s")


__all__ = ["CACHE_FILE", "RESULT_FILE", "describe", "run_search", "search_ids", "search_tokens",
           "sequence_length", "write_outputs"]
