"""The search stage: model + scores + budget (or a plan) + held-out text -> plan.json, search.json.

    held_out = held_out_from_files(files, tokenizer, sequence_length(scores, config), config)
    found = run_search(model, scores, SolveConfig(budget=0.25), held_out, config, out=Path("runs/x"))

The held-out text is split by document (grape.data.split): the search measures on one set and
makes its final choice on another (`grape run` without --search-data holds both out of the
calibration text).

`grape run` (grape.pipeline), `grape search` (grape/cli/commands/search.py) and the Python API
(`grape.search`) all call :func:`run_search` with a :class:`~grape.searching.config.SearchConfig`,
so the same inputs give the same plan whichever way the stage is called. The algorithm itself is
grape.searching.algorithm.

The model is measured whole when it is loaded, or layer by layer from its shards
(grape.searching.sequential) when calibration's rule says so (:func:`search_mode`: `--mode
sequential`, or `auto` and the model does not fit); both give the same plans and NLLs.
`grape search` and `grape.search` given a model directory open it with :func:`open_model`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from grape.errors import DataError
from grape.searching.config import SearchConfig, SearchResult
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

    from grape.evaluation.perplexity import load_documents, pack_windows, spread_windows, token_stream

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
    """The token targets of the held-out split (grape.data.split.Targets) for `config`."""
    from grape.data.split import Targets

    return Targets(config.tokens, config.confirm_tokens if config.confirm else 0, calibration_tokens,
                   config.held_out_share)


def held_out_from_files(files, tokenizer, seq_len: int, config: SearchConfig):
    """Search and confirmation windows of `seq_len` tokens from --search-data files, split by
    document, each file's domain weighing the same (grape.data.split.split_files)."""
    from grape.data.split import split_files

    return split_files(files, tokenizer, targets(config), seq_len=seq_len, seed=config.seed)


def held_out_from_ids(ids, confirm_ids=None):
    """Held-out windows from ready input ids (each row its own document)."""
    import numpy as np

    from grape.data.split import HeldOut, Windows

    def wrap(t):
        return None if t is None else Windows(t, np.arange(t.shape[0]), ())

    return HeldOut(wrap(ids), wrap(confirm_ids), source="input ids")


@dataclass(frozen=True)
class SearchMode:
    """How the search measures: `mode` 'whole' (the loaded model) or 'sequential' (layer by layer
    from the shards), and whether the whole model `fits` in memory for the stages that need it
    loaded (evaluation, in-memory apply, stability)."""

    mode: str
    fits: bool
    reason: str


def search_mode(model_dir, calibration, check_fit: bool = True) -> SearchMode:
    """Calibration's rule (grape.calibration.stage, grape.models.placement) for the search: `--mode` as
    asked, else 'auto' - sequential when the weights need more than the free memory's headroom
    or are stored quantised. Whether the model fits is the size check alone (a quantised model
    that fits is still loaded for evaluation). `calibration`: a CalibrationConfig (its mode,
    device_map and dtype are read). Reads config.json only (a meta-device skeleton);
    `check_fit` False: a mode given is taken as it is, without the size check."""
    import torch

    from grape.calibration.stage import joined_world
    from grape.models.layerwise import build_skeleton, model_bytes
    from grape.models.loading import device_map
    from grape.models.files import read_config
    from grape.models.placement import choose_mode, uses_cuda, whole_capacity
    from grape.models.quantized import describe
    from grape.calibration.sequential import _config, resolve_dtype

    if calibration.mode != "auto" and not check_fit:
        return SearchMode(calibration.mode, calibration.mode == "whole", f"--mode {calibration.mode}")
    placement = device_map(calibration.device_map, calibration.offload_folder)
    device = torch.device("cuda" if uses_cuda(placement) else "cpu")
    dtype = resolve_dtype(calibration.dtype, device, _config(model_dir))
    needed = model_bytes(build_skeleton(model_dir, dtype), dtype)
    with joined_world(placement) as world:
        capacity, where = whole_capacity(placement, world)
    size = choose_mode("auto", needed, capacity, where, None)
    if calibration.mode != "auto":
        return SearchMode(calibration.mode, calibration.mode == "whole" or size.mode == "whole",
                          f"--mode {calibration.mode}")
    auto = choose_mode("auto", needed, capacity, where, describe(read_config(model_dir)))
    return SearchMode(auto.mode, size.mode == "whole", auto.reason)


def open_sequential(model_dir, calibration, reason: str, scratch: Path | None = None):
    """The checkpoint opened for a layer-sequential search (grape.searching.sequential.LayerStream)
    on calibration's one device (--device-map / --device), its dtype and --hidden-states."""
    from grape.calibration.distributed import World
    from grape.models.loading import device_map
    from grape.models.placement import sequential_device
    from grape.searching.sequential import SequentialModel, open_stream

    device = sequential_device(device_map(calibration.device_map, calibration.offload_folder), World())
    return open_stream(SequentialModel(Path(model_dir), str(device), calibration.dtype,
                                       calibration.hidden_states, reason, scratch))


def open_model(model_dir, calibration, held: SearchMode | None = None, scratch: Path | None = None):
    """(model, identity): the model the search measures, held as `held` says - loaded whole on
    calibration's device map and dtype, as every verb loads it, or opened layer by layer from
    its shards (:func:`open_sequential`) - and its identity (router fingerprint included) to
    check the scores against. `held` None: :func:`search_mode` without the size check for a
    mode given. `grape search` and `grape.search` both call it; `scratch`: the folder of
    disk-held hidden states (None: the temporary folder)."""
    from grape.models.adapters import get_adapter
    from grape.models.loading import load_model

    if calibration.mode not in ("auto", "whole", "sequential"):
        raise UserError(f"mode {calibration.mode!r} is not one of auto, whole, sequential")
    held = held or search_mode(model_dir, calibration, check_fit=False)
    if held.mode == "sequential":
        stream = open_sequential(model_dir, calibration, held.reason, scratch=scratch)
        return stream, stream.identity()
    model = load_model(model_dir, calibration.device_map, calibration.dtype,
                       offload_folder=calibration.offload_folder)
    return model, get_adapter(model).identity()


def run_search(model, scores, solve: SolveConfig, held_out, config: SearchConfig,
               out: Path | None = None, plan: Plan | None = None) -> SearchResult:
    """The stage: the loss-verified search (grape.searching.algorithm.search) on `held_out`
    (grape.data.split.HeldOut) from `plan` or the configured solver's; with `out`, it resumes
    from and records into out/search.cache.json and writes out/plan.json, out/search.json and,
    when it measured NLL curves, out/scores.npz (the scores with them, so that `grape solve
    --objective curves` plans on measured costs). `model`: the loaded model, or a checkpoint
    opened layer by layer (:func:`open_sequential`, or a grape.searching.sequential.SequentialModel
    to open)."""
    from grape.searching.algorithm import search
    from grape.searching.sequential import SequentialModel, open_stream

    if isinstance(model, SequentialModel):
        model = open_stream(model)
    cache = Path(out) / CACHE_FILE if out is not None else None
    confirm = held_out.confirm
    found = search(model, scores, solve, held_out.search.ids, config, cache=cache,
                   confirm_ids=confirm.ids if confirm is not None else None, plan=plan,
                   groups=held_out.search.groups, confirm_groups=confirm.groups if confirm is not None else None)
    found.notes[:0] = list(held_out.notes)
    found.held_out = held_out.record()
    stamp_choice(found)
    if out is not None:
        write_outputs(found, scores, Path(out))
    return found


def stamp_choice(found: SearchResult) -> None:
    """Record in the chosen plan how the search chose it (plan.json carries it)."""
    best = found.best.plan
    best.provenance = {**best.provenance, "search": {
        "chosen": found.best.name, "role": found.best.role.value, "passes": found.passes,
        "tokens_measured": found.tokens_measured, "computed_passes": round(found.computed_passes, 2),
        "nll": found.best.nll, "unpruned_nll": found.unpruned_nll,
        "versus_best_uniform": found.versus_uniform}}


def write_outputs(found: SearchResult, scores, out: Path) -> None:
    from grape.searching.sensitivity import with_nll_curves
    from solvers._io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    if found.nll_curves is not None:  # measured once: `grape solve --scores` can reuse them
        with_nll_curves(scores, found.nll_curves).save(out / "scores.npz")
    found.best.plan.save(out / "plan.json")
    atomic_write_text(out / RESULT_FILE, json.dumps(found.to_json(), indent=2) + "\n")


def describe(found: SearchResult) -> str:
    """The lines `grape run` and `grape search` print when the search is done."""
    sequential = found.mode.get("mode") == "sequential"
    how = ("computed layer by layer from the shards, a generation of plans at a time" if sequential
           else "computed, the rest reused layers or cached measurements")
    line = (f"search: chose {found.best.name} ({found.best.role.value}; search NLL {found.best.nll:.4f}, "
            f"unpruned {found.unpruned_nll:.4f}) after {found.passes} passes ({found.computed_passes:.1f} "
            f"{how})"
            + (f" and {len(found.confirmed)} confirmation passes" if found.confirmed else "")
            + f" ({found.tokens_measured:,} tokens), {found.seconds:.0f} s")
    versus = found.versus_uniform
    if versus is not None and versus["best_uniform"] != found.best.name:
        line += (f"\n    against the best uniform plan ({versus['best_uniform']}) on the {versus['on']} "
                 f"tokens: {versus['difference']:+.4f} +- {versus['se']:.4f} nats/token (SE by "
                 f"document, {versus['documents']} documents)")
    return line + "".join(f"\n    note: {n}" for n in found.notes if n.startswith(("held out", "confirmation on", "calibration:")))


__all__ = ["CACHE_FILE", "RESULT_FILE", "SearchMode", "describe", "held_out_from_files", "stamp_choice",
           "held_out_from_ids", "open_model", "open_sequential", "run_search", "search_mode",
           "search_tokens", "sequence_length", "targets", "write_outputs"]
