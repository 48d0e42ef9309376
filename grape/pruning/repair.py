"""Prune, then repair: the kept experts of each pruned MoE layer are re-fitted in closed form so
the layer's output comes back toward the original's (issue 27; docs/repair.md).

    report = prune_and_repair(model, plan, ApplyConfig(repair="lstsq"), input_ids)
    report.line()       # "repair lstsq: 6 layers, output error 0.31 -> 0.12 of ..., 4.1 s"

The model is pruned one MoE layer at a time, in order, on calibration tokens (OBS / SparseGPT-
style layer-sequential reconstruction): the tokens run through the already pruned-and-repaired
layers below; at MoE layer l the block's input x is captured, the ORIGINAL block's routed output
y on x is computed, the layer is then pruned (exactly as ``apply_plan(remove)`` prunes it) and
the fit of grape.pruning.repair_fit brings the pruned routed output back toward y on those tokens;
then the tokens go through the pruned, repaired layer to the next. Only the kept experts' down
projections change (values, never names or shapes), and with ``router`` / ``lstsq+router`` the
kept router rows (grape.pruning.repair_router's short local re-fit): the checkpoint is as
standard as without repair. A fit that would not lower the layer's error on its tokens is
undone (the layer stays as it was before that fit), so a repaired layer is never worse than the
unrepaired one on what was measured.

Memory: the model, the calibration hidden states (tokens x hidden), and one layer's fitting
state (x and y, tokens x hidden each, plus one expert's activations). A checkpoint too large
for memory is repaired from its shards one decoder layer at a time by grape.pruning.repair_sequential,
which runs the same LayerPass and repair_layer on each layer as it is loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from grape.models.adapters import MoEAdapter, get_adapter
from grape.errors import ArchitectureError, DataError, PlanError
from grape.pruning.apply import (APPLIED_METHOD_ATTR, APPLIED_PLAN_ATTR, AUTO_REPAIR, REPAIR_METHODS, ApplyConfig,
                                  apply_plan, validate_plan)
from grape.pruning.repair_fit import FITS, Routing, mean_energy, mean_error, routed
from grape.pruning import repair_experts
from grape.pruning.repair_experts import expert_parameters, fit_experts
from grape.pruning.repair_router import DEFAULT_LR, DEFAULT_STEPS, fit_router, router_parameters
from solvers.plan import Plan

logger = logging.getLogger("grape.pruning.repair")

# ridge of each closed-form fit when RepairSettings leaves it unset (chosen on the zoo, docs/repair.md)
DEFAULT_RIDGE = {"scale": 1e-3, "lstsq": 0.1}
# the fits each --repair method runs, in order (grape.pruning.repair_fit's FITS and the router
# re-fit of grape.pruning.repair_router); each is undone on its own if it does not lower the
# layer's error, so lstsq+router is never worse than lstsq on the fitting tokens
STAGES = {"scale": ("scale",), "lstsq": ("lstsq",), "router": ("router",),
          "lstsq+router": ("lstsq", "router"), "lstsq+experts": ("lstsq", "experts")}


@dataclass(frozen=True)
class RepairSettings:
    """How the fits run (what is fitted is ApplyConfig.repair).

    ridge: strength of the pull toward the unrepaired weights, relative to the data's own
        energy (see grape.pruning.repair_fit); None: the method's default (DEFAULT_RIDGE).
    sweeps: passes of ``lstsq``'s block coordinate descent over the kept experts.
    batch_size: calibration sequences per forward pass.
    router_steps, router_lr: the ``router`` re-fit's Adam steps per layer and step size (the
        largest logit change of a step, relative to the logits' spread; grape.pruning.repair_router).
    experts_steps, experts_lr, experts_batch: the ``experts`` re-fit's Adam steps per layer, step
        size (relative to each tensor's RMS value) and tokens per step (grape.pruning.repair_experts).
    """

    ridge: float | None = None
    sweeps: int = 2
    batch_size: int = 4
    router_steps: int = DEFAULT_STEPS
    router_lr: float = DEFAULT_LR
    experts_steps: int = repair_experts.DEFAULT_STEPS
    experts_lr: float = repair_experts.DEFAULT_LR
    experts_batch: int = repair_experts.DEFAULT_BATCH

    def __post_init__(self) -> None:
        if self.ridge is not None and not (self.ridge >= 0 and self.ridge < float("inf")):
            raise PlanError(f"repair ridge {self.ridge!r} must be a finite number >= 0")
        if self.sweeps < 1 or self.batch_size < 1:
            raise PlanError(f"repair sweeps ({self.sweeps}) and batch size ({self.batch_size}) "
                            "must be at least 1")
        if self.router_steps < 0 or not (0 < self.router_lr < float("inf")):
            raise PlanError(f"repair router steps ({self.router_steps}) must be at least 0 and its "
                            f"step size ({self.router_lr!r}) a finite number > 0")
        if self.experts_steps < 0 or self.experts_batch < 1 or not (0 < self.experts_lr < float("inf")):
            raise PlanError(f"repair experts steps ({self.experts_steps}) must be at least 0, its batch "
                            f"({self.experts_batch}) at least 1 and its step size ({self.experts_lr!r}) "
                            "a finite number > 0")

    def ridge_for(self, method: str) -> float | None:
        """The ridge of `method`'s closed-form fit (a stage or a --repair method); None: it has none."""
        stage = next((s for s in STAGES.get(method, (method,)) if s in DEFAULT_RIDGE), None)
        if stage is None:
            return None
        return DEFAULT_RIDGE[stage] if self.ridge is None else float(self.ridge)


@dataclass(frozen=True)
class LayerRepair:
    """One layer's fit, measured on its fitting tokens: mean ||y - y'||^2 of the routed output
    before (plainly pruned) and after repair, and the original routed output's mean energy."""

    layer: int
    tokens: int
    energy: float
    before: float
    after: float
    kept_fit: bool  # False: the fit did not lower the error and was undone
    seconds: float

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RepairReport:
    method: str
    layers: list[LayerRepair] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0

    def relative(self, attr: str) -> float:
        """Summed error (before / after) over summed energy of the layers."""
        energy = sum(r.energy for r in self.layers)
        return sum(getattr(r, attr) for r in self.layers) / energy if energy > 0 else 0.0

    def line(self) -> str:
        if self.method == "none":
            return "repair none"
        return (f"repair {self.method}: {len(self.layers)} layer(s) on {self.tokens} tokens, routed "
                f"output error {self.relative('before'):.4f} -> {self.relative('after'):.4f} of its "
                f"energy, {self.seconds:.1f} s")

    def to_json(self) -> dict:
        return {"method": self.method, "seconds": self.seconds, "tokens": self.tokens,
                "relative_error_before": self.relative("before"),
                "relative_error_after": self.relative("after"),
                "layers": [r.to_json() for r in self.layers]}


# -- checks, before any forward ------------------------------------------------------------------
def check_repairable(model: nn.Module, config: ApplyConfig) -> None:
    """Refuse what repair cannot do: another apply method, a quantised model (its experts would
    have to be re-quantised after the fit), a family whose decoder layers cannot be run one at a
    time (their adapter's sequential_refusal: the fit moves the tokens layer by layer)."""
    if config.method != "remove":
        raise PlanError(f"--repair {config.repair} re-fits the experts kept by --method remove; "
                        f"it does not combine with --method {config.method}")
    refusal = layerwise_refusal(getattr(model.config, "model_type", None))
    if refusal:
        raise ArchitectureError(refusal)
    quant = getattr(model.config, "quantization_config", None)
    if quant:
        kind = quant.get("quant_method", "quantised") if isinstance(quant, dict) else type(quant).__name__
        raise ArchitectureError(f"--repair changes expert weights, which this {kind} checkpoint stores "
                                "quantised; apply without --repair (or dequantise the checkpoint first)")


def layerwise_refusal(model_type) -> str | None:
    """Why --repair cannot run on this family (its layers cannot be run one at a time), or None."""
    from grape.models.adapters import adapter_class

    why = getattr(adapter_class(model_type), "sequential_refusal", None)
    return (f"--repair fits one decoder layer at a time, which {model_type} models do not allow "
            f"({why}); apply without --repair") if why else None


def settings_for(config: ApplyConfig, settings: RepairSettings | None) -> RepairSettings:
    """The fits' settings: `settings` when given, else the defaults with the config's router and
    experts flags (--repair-router-steps / -lr, --repair-experts-steps / -lr) where set."""
    if settings is not None:
        return settings
    given = {"router_steps": config.repair_router_steps, "router_lr": config.repair_router_lr,
             "experts_steps": config.repair_experts_steps, "experts_lr": config.repair_experts_lr}
    return RepairSettings(**{k: v for k, v in given.items() if v is not None})


def resolve_repair(model_config: dict, config: ApplyConfig) -> tuple[ApplyConfig, str | None]:
    """``repair='auto'`` made concrete: AUTO_REPAIR where it can run, else none; returns the
    config and, when auto fell back to none, why (one line, for the caller to print). Any other
    repair is returned as it is (check_repair refuses what cannot run)."""
    if config.repair != "auto":
        return config, None
    why = _auto_repair_refusal(model_config, config)
    return replace(config, repair="none" if why else AUTO_REPAIR), why


def _auto_repair_refusal(model_config: dict, config: ApplyConfig) -> str | None:
    """Why AUTO_REPAIR cannot run here, or None."""
    from grape.models.adapters import adapter_class
    from grape.models.quantized import describe

    if config.method != "remove":
        return f"--method {config.method} keeps no re-fitted experts (repair follows remove)"
    if not config.repair_data:
        return "no calibration text to fit on (--repair-data)"
    quant = describe(model_config)
    if quant:
        return f"the checkpoint stores its experts quantised ({quant})"
    model_type = model_config.get("model_type")
    if layerwise_refusal(model_type):
        return f"{model_type} decoder layers cannot run one at a time"
    # an unsupported family (no adapter class) is refused elsewhere, with its own message
    return getattr(adapter_class(model_type), "lstsq_refusal", None)


def check_tokens(input_ids, attention_mask, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration tokens as a (rows, seq) int64 matrix (and mask), checked."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise DataError(f"repair tokens must be a non-empty (rows, seq_len) integer matrix; got shape "
                        f"{tuple(ids.shape)} of {ids.dtype}")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise DataError(f"repair tokens must be ids in [0, {vocab_size}) (the model's vocabulary); "
                        f"got {int(ids.min())}..{int(ids.max())}: tokenised with another tokenizer?")
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask)
    if tuple(mask.shape) != tuple(ids.shape):
        raise DataError(f"repair attention mask has shape {tuple(mask.shape)}; the tokens have {tuple(ids.shape)}")
    return ids, mask.long()


# -- the verb ------------------------------------------------------------------------------------
def prune_and_repair(model: nn.Module, plan: Plan, config: ApplyConfig, input_ids,
                     attention_mask=None, settings: RepairSettings | None = None) -> RepairReport:
    """Apply `plan` (method remove) to `model` in place, repairing each pruned MoE layer with
    ``config.repair`` on the calibration tokens `input_ids` (see the module docstring).
    ``repair='none'``: exactly ``apply_plan`` (the tokens are not used)."""
    settings = settings_for(config, settings)
    config, _ = resolve_repair(model.config.to_dict(), config)
    plain = ApplyConfig(config.method, config.merge_weights, config.allow_lower_top_k)
    if config.repair == "none":
        apply_plan(model, plan, plain)
        return RepairReport("none")
    check_repairable(model, config)
    adapter = get_adapter(model)
    validate_plan(adapter, plan, allow_lower_top_k=config.allow_lower_top_k)
    ids, mask = check_tokens(input_ids, attention_mask, int(model.config.get_text_config().vocab_size))
    start = time.perf_counter()
    report = RepairReport(config.repair, tokens=int(ids.numel() if mask is None else mask.sum()))
    pruned = [layer for layer in plan.layers if plan.removed[layer]]
    if pruned:
        _run_layers(model, adapter, LayerPass(adapter, MemoryBatches(model, ids, mask, settings)),
                   plan, pruned, config.repair, settings, report)
    sync = getattr(adapter, "sync_config", None)
    if sync is not None:
        sync()
    setattr(model, APPLIED_PLAN_ATTR, plan)
    setattr(model, APPLIED_METHOD_ATTR, config.method)
    report.seconds = time.perf_counter() - start
    logger.info(report.line())
    return report


def _run_layers(model: nn.Module, adapter: MoEAdapter, passes: "LayerPass", plan: Plan,
                pruned: list[int], method: str, settings: RepairSettings, report: RepairReport) -> None:
    """The layer-sequential loop on a loaded model: each pruned layer repaired on its block
    inputs, the tokens moved on through it, up to the last pruned layer (nothing above changes)."""
    from grape.models.layerwise import decoder_layers

    for index, layer in enumerate(decoder_layers(model)):
        if index > pruned[-1]:
            break
        if index in pruned:
            x = passes.block_inputs(index, layer)
            report.layers.append(repair_layer(adapter, index, plan.kept[index], x, method, settings))
        if index < pruned[-1]:
            passes.forward(index, layer)


class _Stop(Exception):
    """Raised by the block's pre-hook once its input is captured: the rest of the layer is not
    needed for the capture pass."""


class MemoryBatches:
    """The calibration tokens' hidden states as a list of tensors, one per batch of
    `settings.batch_size` rows, with the arguments the model's own forward gives each layer."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None,
                 settings: RepairSettings):
        from grape.evaluation.perplexity import input_device
        from grape.calibration.sequential import layer_arguments

        device = input_device(model)
        dtype = model.get_input_embeddings().weight.dtype
        rows = range(0, ids.shape[0], settings.batch_size)
        self.masks = [None if mask is None else mask[r:r + settings.batch_size] for r in rows]
        embed = model.get_input_embeddings()
        with torch.no_grad():
            self.hidden = [embed(ids[r:r + settings.batch_size].to(device)) for r in rows]
        # the rotary embeddings, causal mask and positions the model's own forward gives a layer
        self.layer_args = [layer_arguments(model, tuple(ids[r:r + settings.batch_size].shape), m,
                                           device, dtype) for r, m in zip(rows, self.masks)]

    def __len__(self) -> int:
        return len(self.hidden)

    def get(self, batch: int) -> torch.Tensor:
        return self.hidden[batch]

    def put(self, batch: int, value: torch.Tensor) -> None:
        self.hidden[batch] = value

    def arguments(self, batch: int, index: int) -> tuple[tuple, dict]:
        return self.layer_args[batch][index]


class LayerPass:
    """The calibration tokens moved through decoder layers one at a time. `batches` holds their
    hidden states (MemoryBatches; grape.pruning.repair_sequential keeps them in a HiddenStates): get /
    put / arguments per batch, and `masks`. One code path for both, so the in-memory and the
    layer-sequential repair see bit-identical block inputs."""

    def __init__(self, adapter: MoEAdapter, batches):
        self.adapter, self.batches = adapter, batches

    def _call(self, index: int, layer: nn.Module, batch: int):
        args, kwargs = self.batches.arguments(batch, index)
        device = next(layer.parameters()).device
        return layer(self.batches.get(batch).to(device), *args, **kwargs)

    @torch.no_grad()
    def forward(self, index: int, layer: nn.Module) -> None:
        for batch in range(len(self.batches)):
            out = self._call(index, layer, batch)
            self.batches.put(batch, out[0] if isinstance(out, (tuple, list)) else out)

    @torch.no_grad()
    def block_inputs(self, index: int, layer: nn.Module) -> torch.Tensor:
        """The MoE block's input on every real (unpadded) calibration token, (T, H)."""
        block = self.adapter.moe_blocks()[index]
        seen: list[torch.Tensor] = []

        def capture(_module, args, kwargs):
            seen.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        handle = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for batch in range(len(self.batches)):
                try:
                    self._call(index, layer, batch)
                except _Stop:
                    pass
        finally:
            handle.remove()
        parts = []
        for batch, x in enumerate(seen):
            flat = x.reshape(-1, x.shape[-1])
            mask = self.batches.masks[batch]
            parts.append(flat if mask is None else flat[mask.reshape(-1).to(flat.device).bool()])
        return torch.cat(parts)


@torch.no_grad()
def repair_layer(adapter: MoEAdapter, layer: int, kept: list[int], x: torch.Tensor, method: str,
                 settings: RepairSettings) -> LayerRepair:
    """Prune `layer` to `kept` and fit `method`'s stages on the block inputs `x` (see the module
    docstring)."""
    start = time.perf_counter()
    target = routed(adapter.experts(layer), x, Routing(*adapter.route(layer, x)))
    adapter.keep_experts(layer, kept)
    before = error = layer_error(adapter, layer, x, target)
    for stage in STAGES[method]:
        error = _fit_stage(adapter, layer, x, target, stage, settings, error)
    return LayerRepair(layer, int(x.shape[0]), mean_energy(target), before, error, error < before,
                       time.perf_counter() - start)


def layer_error(adapter: MoEAdapter, layer: int, x: torch.Tensor, target: torch.Tensor) -> float:
    """mean ||y - y'||^2 of the layer's routed output as the model computes it now (its routing
    recomputed: the router stage changes it)."""
    return mean_error(target, routed(adapter.experts(layer), x, Routing(*adapter.route(layer, x))))


def _stage_tensors(adapter: MoEAdapter, layer: int, stage: str) -> list[torch.Tensor]:
    """The tensors `stage` may change (what undoing it restores)."""
    if stage == "router":
        return list(router_parameters(adapter, layer).values())
    experts = adapter.experts(layer)
    if stage == "experts":
        return list(expert_parameters(experts).values())
    return [t for n in ("down_proj", "down_proj_bias") if (t := getattr(experts, n, None)) is not None]


def _fit_stage(adapter: MoEAdapter, layer: int, x: torch.Tensor, target: torch.Tensor, stage: str,
               settings: RepairSettings, error: float) -> float:
    """Run one fit; keep it only if it lowers the layer's error (`error` before it): never worse
    than the layer it started from on what was measured. Returns the error after."""
    saved = [(t, t.detach().clone()) for t in _stage_tensors(adapter, layer, stage)]
    if stage == "router":
        fit_router(adapter, layer, x, target, settings.router_steps, settings.router_lr)
    elif stage == "experts":
        fit_experts(adapter.experts(layer), x, target, Routing(*adapter.route(layer, x)), settings.experts_steps,
                    settings.experts_lr, settings.experts_batch)
    else:
        FITS[stage](adapter.experts(layer), x, target, Routing(*adapter.route(layer, x)),
                    adapter.num_experts(layer), settings.ridge_for(stage), settings.sweeps)
    after = layer_error(adapter, layer, x, target)
    if after < error:
        return after
    for tensor, value in saved:
        tensor.copy_(value)
    logger.warning("repair %s did not lower layer %d's output error on its tokens; it is undone",
                   stage, layer)
    return error


def repair_needs(config: ApplyConfig) -> bool:
    """Whether `config` asks for a repair (which needs calibration tokens)."""
    return config.repair != "none"


__all__ = ["DEFAULT_RIDGE", "STAGES", "LayerPass", "LayerRepair", "MemoryBatches", "REPAIR_METHODS",
           "RepairReport", "RepairSettings", "check_repairable", "check_tokens", "layer_error",
           "layerwise_refusal", "prune_and_repair", "repair_layer", "repair_needs", "resolve_repair", "settings_for"]
