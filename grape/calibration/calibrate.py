"""Calibration: model + data -> Scores (per-expert statistics, similarity, layer cost curves).

    from grape.calibration.calibrate import CalibrationConfig, calibrate
    from grape.data.text import load_calibration_data

    config = CalibrationConfig(seq_len=2048, samples=1024)
    data = load_calibration_data(["corpus/"], tokenizer, seq_len=config.seq_len,
                                 samples=config.samples, seed=config.seed)
    scores = calibrate(model, data, config)
    scores.save("scores.npz")

One forward pass over the data under an :class:`grape.calibration.observer.ExpertObserver` gives the
per-expert statistics (from the model's real routing and each routed token's real expert output)
and each MoE block's output energy. The observer also keeps `subsample` rows of every MoE layer's
input; on those rows every expert of the layer is evaluated once, which gives

* similarity matrices (``cka``: linear CKA of the experts' outputs; ``cosine``: cosine of their
  mean outputs) and, without data, ``router`` (cosine of the router weight rows);
* the layer cost curve: cost_curve[n] is the mean squared error of the routed output when only
  the n most important experts (by `criterion`) are kept, routed as the model routes with the
  others masked (see :func:`grape.calibration.scoring.cost_curve`).

See docs/calibration.md for the formulas and the normalisation choices.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

import grape
from grape.models.adapters.base import MoEAdapter
from grape.models.adapters import get_adapter
from grape.data.text import CalibrationData
from grape.calibration.distributed import World, current_world, gather_to_main, owner, reduce_layer, share
from grape.errors import DataError
from grape.flags import flag
from grape.models.loading import DTYPES
from grape.models.files import check_seq_len
from grape.models.sizes import model_sizes
from grape.calibration.observer import ExpertObserver, per_call_quota, sample_plan
from grape.calibration.resume import CalibrationCheckpoint, run_key, weight_files_key
from grape.calibration.runreport import Meter
from grape.calibration.scoring import (  # noqa: F401 - tests import the similarity measures from here
    OUTPUT_SIMILARITIES,
    SIMILARITIES,
    all_expert_outputs,
    assemble_scores,
    cost_curve,
    layer_scores,
    linear_cka,
    mean_output_cosine,
    merge_layers,
    onloaded,
)
from solvers.errors import ScoresError
from solvers.scores import CRITERIA, NORMALIZATIONS, OPTIONAL_STATS, LayerScores, Scores


# -- configuration --------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationConfig:
    """Every calibration setting; the measurement settings are recorded in the scores file, the
    runtime ones (RUNTIME_FIELDS: where and how the pass runs) change no score."""

    # every field is also a `grape calibrate` flag (grape/flags.py)
    seq_len: int = field(default=2048, metadata=flag(
        "tokens per packed sequence; one longer than the model's context is capped at it, with a "
        "notice"))
    samples: int = field(default=1024, metadata=flag("packed sequences"))
    seed: int = field(default=0, metadata=flag("document shuffle and subsample seed"))
    text_field: str = field(default="text", metadata=flag("JSONL / dataset field holding the text"))
    batch_size: int = field(default=4, metadata=flag("sequences per forward pass"))
    similarity: tuple[str, ...] = field(default=("cka", "cosine", "router"), metadata=flag(
        "comma-separated similarity kinds from cka, cosine, router; 'none' for none", items=True))
    subsample: int = field(default=256, metadata=flag(
        "tokens per MoE layer on which every expert is evaluated (similarity, cost curves)"))
    cost_curves: bool = field(default=True, metadata=flag("skip the layer cost curves", negate=True))
    reconstruction: bool = field(default=True, metadata=flag(
        "skip the greedy re-routed elimination order on the subsample (criterion `reconstruction`; "
        "also off with --subsample 0)", negate=True))
    reconstruction_tokens: int = field(default=2048, metadata=flag(
        "tokens per MoE layer for the reconstruction order (more than --subsample: the greedy makes "
        "E-1 choices, and 256 tokens leave them noisy; similarity and cost curves use --subsample "
        "of them)"))
    criterion: str = field(default="reap_mass", metadata=flag(
        "expert order for the cost curves; recorded for the solver", choices=lambda: sorted(CRITERIA)))
    normalize: str = field(default="none", metadata=flag(
        "cross-layer normalisation recorded for the solver (docs/calibration.md)",
        choices=lambda: sorted(NORMALIZATIONS)))
    progress: bool = field(default=True, metadata=flag("hide progress bars", negate=True))
    # runtime: how the pass runs (grape.calibration.stage), never what it measures
    mode: str = field(default="auto", metadata=flag(
        "'whole': the model on its devices; 'sequential': one decoder layer at a time on one "
        "device (any size of model; --sequential is short for it); 'auto': whole when the model "
        "fits the devices (or host memory), else sequential", choices=("auto", "whole", "sequential")))
    hidden_states: str = field(default="auto", metadata=flag(
        "sequential mode: where the calibration set's hidden states live between layers; 'auto': "
        "the device when they fit, else host memory, else a memory-mapped file in OUT.partial/",
        choices=("auto", "device", "cpu", "disk")))
    checkpoint_every: int = field(default=32, metadata=flag(
        "save resumable progress to OUT.partial/ every N batches (whole-model mode; sequential "
        "mode saves after every layer); rerunning the same command resumes from it; 0: no "
        "checkpoints", metavar="N"))
    device_map: str = field(default="auto", metadata=flag(
        "accelerate device_map: 'auto' (all GPUs, else CPU), 'balanced', 'cpu', 'cuda:0', or a "
        "JSON object mapping module names to devices"))
    offload_folder: str | None = field(default=None, metadata=flag(
        "folder for weights a --device-map puts on 'disk'", type=str, metavar="DIR"))
    dtype: str = field(default="auto", metadata=flag(
        "'auto': float32 on CPU, the checkpoint's dtype on GPU",
        choices=DTYPES))

    def validate(self) -> None:
        if self.checkpoint_every < 0:
            raise DataError(f"checkpoint_every must be >= 0 batches, got {self.checkpoint_every}")
        for name in ("seq_len", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.subsample < 0:
            raise DataError(f"subsample must be >= 0 tokens per layer, got {self.subsample}")
        if self.reconstruction_tokens < 1:
            raise DataError(f"reconstruction_tokens must be at least 1, got {self.reconstruction_tokens}")
        unknown = [k for k in self.similarity if k not in SIMILARITIES]
        if unknown:
            raise ScoresError(f"unknown similarity {unknown}; choose from {list(SIMILARITIES)}")
        if self.criterion not in CRITERIA:
            raise ScoresError(
                f"unknown criterion {self.criterion!r}; choose one of {sorted(CRITERIA)}"
            )
        if self.criterion in OPTIONAL_STATS and not (self.reconstruction and self.subsample > 0):
            raise DataError(f"criterion {self.criterion!r} is measured on the subsample; drop "
                            "--no-reconstruction / --subsample 0, or choose another --criterion")
        if self.normalize not in NORMALIZATIONS:
            raise ScoresError(
                f"unknown normalisation {self.normalize!r}; choose one of {sorted(NORMALIZATIONS)}"
            )
        if self.subsample == 0 and self.needs_subsample:
            raise DataError(
                "similarity from outputs (cka, cosine) and cost curves need a token "
                "subsample; set subsample > 0 (e.g. 256) or ask only for 'router'"
            )

    @property
    def sample_quota(self) -> int:
        """Rows of each MoE layer's input the observer keeps: `subsample`, or more for the
        reconstruction order (similarity and cost curves take `subsample` of them)."""
        if not self.needs_subsample:
            return 0
        return max(self.subsample, self.reconstruction_tokens if self.reconstruction and self.subsample > 0 else 0)

    def measurement_settings(self) -> dict:
        """The fields that change what is measured (RUNTIME_FIELDS left out): what the scores
        file records and the resume key hashes."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    @property
    def needs_subsample(self) -> bool:
        return (self.cost_curves or (self.reconstruction and self.subsample > 0)
                or any(k in OUTPUT_SIMILARITIES for k in self.similarity))


# fields that say how a pass runs, not what it measures: a resumed run may change them
RUNTIME_FIELDS = ("progress", "mode", "hidden_states", "checkpoint_every", "device_map",
                  "offload_folder", "dtype")


# -- the verb -------------------------------------------------------------------------------
def _input_device(model: nn.Module) -> torch.device:
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def is_tokenized(data) -> bool:
    """True for data `calibrate` takes as it is (no packing): CalibrationData, an input-ids
    tensor, or a tokenizer's output (a mapping / BatchEncoding holding `input_ids`)."""
    return isinstance(data, (CalibrationData, torch.Tensor)) or (
        isinstance(data, Mapping) and "input_ids" in data
    )


def _int_matrix(value, name: str) -> torch.Tensor:
    try:  # a tokenizer without return_tensors gives lists of lists
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"calibration {name} must be a 2-D integer tensor (tokenize with padding=True, "
            f"return_tensors='pt'): {exc}"
        ) from None
    if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex():
        raise DataError(
            f"calibration {name} must be a 2-D integer tensor (batch, seq), got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor


def _as_input_ids(
    data: CalibrationData | torch.Tensor | Mapping,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(input_ids, attention_mask or None when every position is real, provenance)."""
    if isinstance(data, CalibrationData):
        return data.input_ids, None, dict(data.provenance)
    if isinstance(data, torch.Tensor) and data.dim() == 2 and not data.is_floating_point():
        return data, None, {"sources": ["input_ids tensor"]}
    if isinstance(data, Mapping) and "input_ids" in data:
        input_ids = _int_matrix(data["input_ids"], "input_ids")
        mask = data.get("attention_mask")
        if mask is None:
            return input_ids, None, {"sources": ["input_ids tensor"]}
        mask = _int_matrix(mask, "attention_mask")
        return input_ids, _check_mask(mask, input_ids), {"sources": ["tokenized batch"]}
    raise DataError(
        f"calibration data must be a CalibrationData (grape.data.text.load_calibration_data), "
        f"a 2-D integer tensor of input ids, or a tokenizer's output with input_ids (and "
        f"attention_mask), got {type(data).__name__}"
    )


def _check_mask(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask as bool, or None when it masks nothing (the unmasked forward is then
    the exact same computation as for an input-ids tensor)."""
    if mask.shape != input_ids.shape:
        raise DataError(
            f"calibration attention_mask has shape {tuple(mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError("calibration attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise DataError("calibration attention_mask marks no real token; pass non-empty texts")
    return None if bool(mask.all()) else mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position within its own sequence (cumsum - 1; 0 on padding). A forward
    does not always derive these from the mask (generate does), and with left padding the
    default 0..seq-1 would shift every real token's rotary position."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


# -- batches, shared by both modes and every rank -------------------------------------------
@dataclass
class BatchPlan:
    """The batches of the single-process run, what each adds to the subsample, and this rank's
    share. A rank of a data-parallel run runs exactly these batches, so its forwards and its
    subsample rows are the single-process run's (see grape.calibration.distributed)."""

    batches: list[torch.Tensor]
    masks: list[torch.Tensor | None]
    sample_rows: list[int]  # subsample rows batch b contributes (observer call b + 1)
    mine: range  # batch indices this rank runs

    def masked_batches(self) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        return [(b, self.batches[b], self.masks[b]) for b in self.mine]


def plan_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: CalibrationConfig, world: World) -> BatchPlan:
    batches = list(input_ids.split(config.batch_size))
    masks = ([None] * len(batches) if attention_mask is None
             else list(attention_mask.split(config.batch_size)))
    quota = config.sample_quota
    available = [b.numel() if m is None else int(m.sum()) for b, m in zip(batches, masks)]
    rows = sample_plan(quota, per_call_quota(quota, len(batches)), available)
    return BatchPlan(batches, masks, rows, share(len(batches), world))


def prepare_input(data, config: CalibrationConfig, model_config: dict):
    """(input_ids, attention_mask or None, provenance, real token count), checked before any
    forward: the data's form, and positions past the model's context."""
    config.validate()
    input_ids, attention_mask, provenance = _as_input_ids(data)
    check_seq_len(int(input_ids.shape[1]), model_config, "calibration sequence length")
    # statistics count real tokens only: padded positions never reach any accumulator
    tokens = int(input_ids.numel() if attention_mask is None else attention_mask.sum())
    return input_ids, attention_mask, provenance, tokens


def run_settings(config: CalibrationConfig, mode: str, world: World, dtype, identity) -> dict:
    """What changes a run's result (the resume key hashes it with the tokens): every setting
    but the progress bars, the mode, the world size, the dtype and the model (its routers'
    fingerprint, and its weight files: a fine-tune may keep the routers)."""
    return {**config.measurement_settings(), "mode": mode, "world_size": world.size, "dtype": str(dtype),
            "model": identity.fingerprint, "weights": weight_files_key(identity.name_or_path),
            "grape": grape.__version__}


def open_checkpoint(directory, settings: dict, input_ids, attention_mask, world: World,
                    say=print) -> CalibrationCheckpoint | None:
    if directory is None:
        return None
    key = run_key(settings, [input_ids, attention_mask])
    return CalibrationCheckpoint.open(directory, key, world, say=say if world.main else _quiet)


def _quiet(_: str) -> None:
    pass


# -- the verb -------------------------------------------------------------------------------
def calibrate(
    model: nn.Module,
    data: CalibrationData | torch.Tensor | Mapping,
    config: CalibrationConfig | None = None,
    *,
    adapter: MoEAdapter | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 32,
) -> Scores | None:
    """Measure `model` on `data` and return its Scores (carrying the model's identity).

    `data`: packed CalibrationData, a (batch, seq) input-ids tensor, or a tokenizer's output
    (``tokenizer(texts, padding=True, return_tensors="pt")``: a mapping with `input_ids` and
    `attention_mask`). With a mask, the forward gets it plus position ids derived from it (so
    left and right padding give the same results), and padded positions enter no statistic,
    subsample or token count.

    Inside a torch.distributed job (torchrun) each rank runs its share of the batches and the
    statistics are reduced across ranks: rank 0 returns the Scores, the other ranks None.
    `checkpoint`: a folder (grape.calibration.resume) where the accumulators are saved every
    `checkpoint_every` batches; run again with the same folder, settings and data, the pass
    continues from there. The folder is left in place (remove it once the scores are saved)."""
    config = config or CalibrationConfig()
    adapter = adapter or get_adapter(model)
    input_ids, attention_mask, provenance, tokens = prepare_input(data, config,
                                                                  model.config.to_dict())
    world = current_world()
    meter = Meter([p.device for p in model.parameters()])
    with onloaded([adapter.router(layer) for layer in adapter.moe_blocks()]):
        identity = adapter.identity()
    dtype = next(model.parameters()).dtype
    plan = plan_batches(input_ids, attention_mask, config, world)
    store = open_checkpoint(checkpoint, run_settings(config, "whole", world, dtype, identity),
                            input_ids, attention_mask, world)
    was_training = model.training
    model.eval()
    sample_tokens = config.sample_quota
    observer = ExpertObserver(model, adapter, sample_tokens=sample_tokens, seed=config.seed)
    try:
        with torch.no_grad(), observer:
            _observe_batches(model, adapter, observer, plan, config, store, checkpoint_every)
            observer.pause()
            observer.set_token_mask(None)
            layers, sampled = _post_pass(adapter, observer, config, tokens, world)
    finally:
        model.train(was_training)
    report = meter.report("whole", "the model is held on its devices", tokens, world)
    if not world.main:
        return None
    return assemble_scores(identity, layers, tokens, provenance, config, dtype, input_ids,
                           sampled, report, sizes=model_sizes(model, identity))


def layer_device(adapter: MoEAdapter, layer: int) -> torch.device:
    """Where a MoE layer computes (the CPU for weights offloaded to `meta`)."""
    weight = next(adapter.experts(layer).parameters())
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def _observe_batches(model, adapter, observer: ExpertObserver, plan: BatchPlan,
                     config: CalibrationConfig, store: CalibrationCheckpoint | None,
                     every: int) -> None:
    """The observed forwards of this rank's batches, resumed from and saved to `store`."""
    name = f"{store.world.tag()}.observer.pt" if store is not None else ""
    saved = store.load(name) if store is not None else None
    done = 0
    if saved is not None:
        devices = {layer: layer_device(adapter, layer) for layer in adapter.moe_blocks()}
        observer.load_state_dict(saved["observer"], devices)
        done = int(saved["done"])
    device = _input_device(model)
    todo = plan.masked_batches()
    for count, (b, batch, mask) in enumerate(
        _progress(todo[done:], len(todo) - done, "calibrating", config.progress), start=done + 1
    ):
        observer.plan_call(b + 1, plan.sample_rows[b])
        observer.set_token_mask(mask)
        model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1,
              **mask_kwargs(mask, device))
        if store is not None and every > 0 and (count % every == 0 or count == len(todo)):
            store.save(name, {"done": count, "observer": observer.state_dict()})


def _post_pass(adapter: MoEAdapter, observer: ExpertObserver, config: CalibrationConfig,
               tokens: int, world: World) -> tuple[dict[int, LayerScores] | None, dict]:
    """Reduce every MoE layer across ranks, measure similarity and cost curves (each layer on
    one rank), gather the layer scores on rank 0. Returns (layers or None, subsample rows)."""
    moe_layers = sorted(adapter.moe_blocks())
    for layer in moe_layers:
        reduce_layer(observer.layer_state(layer), world, layer_device(adapter, layer))
    sampled = {layer: observer.layer_state(layer).sampled for layer in moe_layers}
    mine = {}
    for position, layer in enumerate(_progress(moe_layers, len(moe_layers),
                                               "similarity and cost curves", config.progress)):
        if owner(position, world) == world.rank:
            mine[layer] = layer_scores(adapter, layer, observer.result(layer), config, tokens)
            observer.release(layer)
    return merge_layers(gather_to_main(mine, world)), sampled


def mask_kwargs(mask: torch.Tensor | None, device: torch.device) -> dict:
    """Forward arguments for a padded batch: the mask, and position ids derived from it."""
    if mask is None:
        return {}
    return {
        "attention_mask": mask.to(device=device, dtype=torch.long),
        "position_ids": position_ids_from_mask(mask).to(device),
    }


_mask_kwargs = mask_kwargs

