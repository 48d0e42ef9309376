"""One-pass per-expert statistics, taken from the routing and expert outputs the model really uses.

How it works. transformers v5 experts modules (`XExperts`, decorated with
`@use_experts_implementation`) dispatch their forward through `ExpertsInterface` by the name in
`config._experts_implementation`. GRAPE registers one more implementation, ``grape_observer``.
While an :class:`ExpertObserver` is active, the model is switched to it; for each MoE layer it

1. receives exactly what the model's router produced: `top_k_index` and `top_k_weights` (softmax,
   sigmoid + correction bias + groups, GPT-OSS router bias, scaling: whatever the family applies);
2. computes each routed pair's expert output f_e(x) with the implementation the model was using
   before: for transformers' stock ``grouped_mm`` backend (the default) by running its steps
   with the outputs exposed before weighting (:func:`_observed_grouped_mm`); for any other
   backend (``eager``, ...) by calling it once on the (token, chosen expert) pairs laid out as
   T*k rows with k=1 and unit weights (:func:`routed_expert_outputs`). Either way the kernels
   and layouts are the experts module's own (GPT-OSS interleaved gate/up, biases, clamped
   activation) and only the routed pairs are computed - never every expert on every token;
3. streams the statistics of `solvers.scores.STAT_NAMES` into float64 accumulators on the
   layer's own device (no host sync per batch);
4. returns sum_j w_j f_j(x), the same combination the built-in implementations compute, so the
   model's outputs are unchanged.

A forward hook on each MoE block adds the block output energy ||y(x)||^2 (shared experts
included). Optionally the observer keeps a random subsample of each layer's input rows for the
redundancy and cost-curve measurements of grape.calibration.calibrate.

Padding. Every MoE block flattens its (batch, seq, hidden) input to batch*seq rows before the
experts, in row-major order. :meth:`ExpertObserver.set_token_mask` takes the batch's attention
mask flattened the same way; while it is set, padded rows enter no statistic, no output energy,
no token count and no subsample (the model still computes them, unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    ExpertsInterface,
    grouped_mm_experts_forward,
)

try:  # the building block of transformers' grouped_mm backend (private; checked by the tests)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - another transformers version: the generic path serves
    _grouped_linear = None

from grape.models.adapters.base import MoEAdapter
from grape.models.adapters import get_adapter
from grape.errors import ArchitectureError
from solvers.scores import STAT_NAMES

OBSERVER_IMPLEMENTATION = "grape_observer"
_STATE_ATTR = "_grape_observer_state"
# column order of the summed statistics; norm_max is kept apart (a max, not a sum)
_SUMMED = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "gate_norm_sq_sum")
assert set(_SUMMED) | {"norm_max"} == set(STAT_NAMES)


def _original_forward(experts: nn.Module) -> Callable:
    """The class's own (eager) forward, under the `use_experts_implementation` wrapper."""
    return getattr(type(experts).forward, "__wrapped__", type(experts).forward)


def routed_expert_outputs(
    base: Callable,
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """f_e(x) for every routed (token, expert) pair, as rows [T*k, H] in the order of
    `top_k_index.reshape(-1)`: one call of the experts implementation `base` with k=1 and unit
    weights."""
    k = top_k_index.shape[-1]
    pairs = hidden.repeat_interleave(k, dim=0) if k > 1 else hidden
    ones = torch.ones((pairs.shape[0], 1), dtype=top_k_weights.dtype, device=top_k_weights.device)
    return base(experts, pairs, top_k_index.reshape(-1, 1), ones)


def _observed_grouped_mm(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    state: "_LayerState",
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward`, step for step, with the per-pair expert outputs
    handed to `state` before they are weighted. Same kernels and order, so the result is
    bit-identical; it avoids the generic path's extra copies of the T*k rows (worth ~10-40% of
    the MoE time on CPU). The tests compare its logits with the stock backend's."""
    device = hidden.device
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden.size(0), hidden.size(-1)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    selected = hidden[perm // num_top_k]
    weights_g = top_k_weights.reshape(-1)[perm]
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    per_expert = torch.histc(
        histc_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1
    )
    offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
    if experts.has_gate:
        up, up_bias = experts.gate_up_proj, experts.gate_up_proj_bias if experts.has_bias else None
    else:
        up, up_bias = experts.up_proj, experts.up_proj_bias if experts.has_bias else None
    proj = _grouped_linear(
        selected,
        up,
        offsets,
        bias=up_bias[expert_ids_g] if up_bias is not None else None,
        is_transposed=experts.is_transposed,
    )
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    down_bias = experts.down_proj_bias[expert_ids_g] if experts.has_bias else None
    proj = _grouped_linear(
        proj, experts.down_proj, offsets, bias=down_bias, is_transposed=experts.is_transposed
    )
    if experts.has_post_expert_norm:
        proj = experts.post_expert_norm(proj)
    with torch.no_grad():
        # pair i of the sorted order belongs to token perm[i] // k
        state.record(
            expert_ids_g, weights_g, proj, None if real is None else real[perm // num_top_k]
        )
    weighted = proj * weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    return weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden.dtype)


def _uses_stock_grouped_mm(state: "_LayerState", experts: nn.Module) -> bool:
    return (
        state.base is grouped_mm_experts_forward
        and _grouped_linear is not None
        and not getattr(experts, "_is_expert_parallel", False)
    )


@dataclass
class _LayerState:
    """Accumulators of one MoE layer, on that layer's device."""

    layer: int
    base: Callable  # the experts implementation the model used before observing
    num_experts: int
    sample_quota: int = 0
    sample_per_call: int = 0
    seed: int = 0
    recording: bool = True
    sums: torch.Tensor | None = None  # (E, len(_SUMMED)) float64
    norm_max: torch.Tensor | None = None  # (E,) float64
    energy: torch.Tensor | None = None  # () float64: sum of ||y||^2 over tokens
    energy_tokens: int = 0
    calls: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    sample_calls: list[int] = field(default_factory=list)  # the call number of each samples entry
    sampled: int = 0
    # (call number, rows to take) for the next forward, set by ExpertObserver.plan_call: the
    # caller's global batch numbering, so a rank of a data-parallel run samples what the
    # single-process run samples from the same batch
    planned: tuple[int, int] | None = None
    token_mask: torch.Tensor | None = None  # (rows,) bool on the host: real tokens of this forward
    _device_masks: dict = field(default_factory=dict)  # token_mask copied to each device once

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        self.token_mask = mask
        self._device_masks = {}

    def real_rows(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The token mask on `device` (None: every row is real), checked against the row count
        the block really flattened, so a family that lays out tokens otherwise fails loudly."""
        if self.token_mask is None:
            return None
        if self.token_mask.numel() != rows:
            raise ArchitectureError(
                f"layer {self.layer}: the token mask has {self.token_mask.numel()} positions but "
                f"the MoE block saw {rows} token rows; set a mask of batch*seq positions for "
                "this forward (or None)"
            )
        if device not in self._device_masks:
            self._device_masks[device] = self.token_mask.to(device, non_blocking=True)
        return self._device_masks[device]

    def record(
        self,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        outputs: torch.Tensor,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add routed pairs to the sums; `real` (bool per pair) drops padded ones. Masking by
        `where` rather than indexing keeps shapes static (no host sync) and stops a padded
        row's inf/nan from reaching a sum."""
        device = outputs.device
        if self.sums is None:
            self.sums = torch.zeros(
                self.num_experts, len(_SUMMED), dtype=torch.float64, device=device
            )
            self.norm_max = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        expert = top_k_index.reshape(-1).to(device)
        gate = top_k_weights.reshape(-1).to(device=device, dtype=torch.float64)
        # the norm reduces in fp32 without materialising an fp32 copy of a bf16 output
        norm = torch.linalg.vector_norm(outputs, dim=-1, dtype=torch.float32).to(torch.float64)
        gate_norm = gate * norm
        values = torch.stack(
            [torch.ones_like(gate), gate, norm, gate_norm, gate_norm * gate_norm], dim=1
        )
        if real is not None:
            real = real.to(device)
            values = torch.where(real[:, None], values, 0.0)
            norm = torch.where(real, norm, 0.0)  # norms are >= 0: a 0 never raises the max
        self.sums.index_add_(0, expert, values)
        self.norm_max.scatter_reduce_(0, expert, norm, reduce="amax")

    def maybe_sample(self, hidden: torch.Tensor) -> None:
        """Keep random rows of this call's input: `sample_per_call` until the quota is met, or
        what `planned` says. The generator is seeded by the call number, so every layer samples
        the same token positions."""
        # candidates are the real rows (from the host-side mask: no device sync); without a
        # mask every row, drawn exactly as before masks existed
        candidates = None if self.token_mask is None else self.token_mask.nonzero().flatten()
        available = hidden.shape[0] if candidates is None else candidates.numel()
        if self.planned is not None:
            self.calls, want = self.planned
            want = min(want, available)
        else:
            want = min(self.sample_per_call, self.sample_quota - self.sampled, available)
            self.calls += 1
        if want <= 0:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.calls)
        rows = torch.randperm(available, generator=generator)[:want]
        rows = (rows if candidates is None else candidates[rows]).sort().values
        self.samples.append(hidden.detach()[rows.to(hidden.device)].clone())
        self.sample_calls.append(self.calls)
        self.sampled += want

    def ensure_accumulators(self, device: torch.device) -> None:
        """Zero accumulators on `device` for a layer that has seen no token yet (a rank with no
        batch of a data-parallel run still takes part in the reductions)."""
        if self.sums is None:
            self.sums = torch.zeros(self.num_experts, len(_SUMMED), dtype=torch.float64,
                                    device=device)
            self.norm_max = torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        if self.energy is None:
            self.energy = torch.zeros((), dtype=torch.float64, device=self.sums.device)

    def state_dict(self) -> dict:
        """Everything accumulated so far, on the host (for a resumable checkpoint)."""
        def host(t):
            return None if t is None else t.detach().cpu()

        return {"sums": host(self.sums), "norm_max": host(self.norm_max),
                "energy": host(self.energy), "energy_tokens": self.energy_tokens,
                "calls": self.calls, "samples": [host(t) for t in self.samples],
                "sample_calls": list(self.sample_calls), "sampled": self.sampled}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        def place(t):
            return None if t is None else t.to(device)

        self.sums, self.norm_max = place(state["sums"]), place(state["norm_max"])
        self.energy, self.energy_tokens = place(state["energy"]), int(state["energy_tokens"])
        self.calls, self.sampled = int(state["calls"]), int(state["sampled"])
        self.samples = [place(t) for t in state["samples"]]
        self.sample_calls = list(state["sample_calls"])

    def add_energy(self, output: torch.Tensor) -> None:
        rows = output.detach().reshape(-1, output.shape[-1])
        per_token = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).to(torch.float64)
        real = self.real_rows(rows.shape[0], rows.device)
        if real is not None:
            per_token = torch.where(real, per_token, 0.0)
        energy = per_token.square().sum()
        self.energy = energy if self.energy is None else self.energy + energy.to(self.energy.device)
        self.energy_tokens += (
            rows.shape[0] if self.token_mask is None else int(self.token_mask.sum())
        )


def _observed_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The `grape_observer` experts implementation (see the module docstring)."""
    state: _LayerState | None = getattr(self, _STATE_ATTR, None)
    if state is None:  # switched to this implementation outside an observer: behave as eager
        return _original_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    if not state.recording:
        return state.base(self, hidden_states, top_k_index, top_k_weights)
    real = state.real_rows(hidden_states.shape[0], hidden_states.device)
    state.maybe_sample(hidden_states)
    if _uses_stock_grouped_mm(state, self):
        return _observed_grouped_mm(self, hidden_states, top_k_index, top_k_weights, state, real)
    tokens, k = top_k_index.shape
    with torch.no_grad():
        outputs = routed_expert_outputs(state.base, self, hidden_states, top_k_index, top_k_weights)
        # pairs are laid out token-major, k per token
        state.record(
            top_k_index, top_k_weights, outputs, None if real is None else real.repeat_interleave(k)
        )
    # the built-in implementations' combination: weight in the promoted dtype, sum over k
    weighted = outputs.view(tokens, k, -1) * top_k_weights.unsqueeze(-1)
    return weighted.sum(dim=1).to(hidden_states.dtype)


ExpertsInterface.register(OBSERVER_IMPLEMENTATION, _observed_experts_forward)


@dataclass
class LayerObservation:
    """What the observer measured for one MoE layer (numpy float64, on the host)."""

    layer: int
    stats: dict[str, np.ndarray]  # STAT_NAMES -> (E,)
    output_energy: float  # mean over tokens of ||y(x)||^2
    tokens: int
    samples: torch.Tensor | None  # (S, H) block inputs on the layer's device, or None


class ExpertObserver:
    """Context manager: while active, every forward of `model` streams per-expert statistics.

    >>> with ExpertObserver(model) as observer:
    ...     for batch in batches:
    ...         model(batch)
    >>> observations = observer.results()

    `sample_tokens` rows of each MoE layer's input are kept (up to `sample_per_call` per
    forward, at the same random positions in every layer) for the redundancy subsample.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter | None = None,
        *,
        sample_tokens: int = 0,
        sample_per_call: int | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.sample_tokens = int(sample_tokens)
        self.sample_per_call = int(
            sample_per_call if sample_per_call is not None else sample_tokens
        )
        self.seed = int(seed)
        self._states: dict[int, _LayerState] = {}
        self._handles: list = []
        self._previous: dict | None = None
        self._token_mask: torch.Tensor | None = None

    # -- installation ---------------------------------------------------------------------
    def _base_implementation(self, layer: int, experts: nn.Module) -> Callable:
        if not hasattr(type(experts).forward, "__wrapped__") or not hasattr(experts, "config"):
            raise ArchitectureError(
                f"layer {layer}: the experts module {type(experts).__name__} does not dispatch "
                "through transformers' ExpertsInterface (@use_experts_implementation), so GRAPE "
                "cannot observe it; use a transformers>=5 model class without remote code"
            )
        name = experts.config._experts_implementation
        if name == OBSERVER_IMPLEMENTATION:
            raise ArchitectureError("this model is already being observed; nest no observers")
        return ALL_EXPERTS_FUNCTIONS.get_interface(name, _original_forward(experts))

    def __enter__(self) -> "ExpertObserver":
        try:
            self._install()
        except BaseException:
            self.__exit__()  # leave no state or hook behind on a model we could not observe
            raise
        return self

    def _install(self) -> None:
        blocks = self.adapter.moe_blocks()
        if not blocks:
            raise ArchitectureError("the model has no MoE layers to observe")
        for layer, block in sorted(blocks.items()):
            experts = self.adapter.experts(layer)
            state = _LayerState(
                layer=layer,
                base=self._base_implementation(layer, experts),
                num_experts=self.adapter.num_experts(layer),
                sample_quota=self.sample_tokens,
                sample_per_call=self.sample_per_call,
                seed=self.seed,
            )
            self._states[layer] = state
            state.set_token_mask(self._token_mask)
            setattr(experts, _STATE_ATTR, state)
            self._handles.append(block.register_forward_hook(self._energy_hook(state)))
        self._previous = self.model.get_experts_implementation()
        self.model.set_experts_implementation(OBSERVER_IMPLEMENTATION)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            self.model.set_experts_implementation(self._previous)
            self._previous = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer, state in self._states.items():
            experts = self.adapter.experts(layer)
            if getattr(experts, _STATE_ATTR, None) is state:
                delattr(experts, _STATE_ATTR)

    @staticmethod
    def _energy_hook(state: _LayerState):
        def hook(module, args, output):
            if state.recording:
                state.add_energy(output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    # -- control and results --------------------------------------------------------------
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Mark the real tokens of the next forwards: `mask` is the batch's attention mask
        (batch, seq), 1/True for a real token, or None for "every token is real". Padded
        positions then enter no statistic, energy, token count or subsample."""
        if mask is not None:
            mask = mask.detach().to("cpu", torch.bool).reshape(-1)
        self._token_mask = mask
        for state in self._states.values():
            state.set_token_mask(mask)

    def pause(self, layers: list[int] | None = None) -> None:
        """Stop recording (the model keeps computing exactly as before), e.g. for extra calls;
        `layers`: only these MoE layers."""
        self.set_recording(False, layers)

    def set_recording(self, recording: bool, layers: list[int] | None = None) -> None:
        for layer, state in self._states.items():
            if layers is None or layer in layers:
                state.recording = recording

    def plan_call(self, call: int | None, rows: int = 0) -> None:
        """The next forward is call number `call` (1-based, the same in every layer) and keeps
        `rows` subsample rows; None: count calls and fill the quota in order (the default)."""
        for state in self._states.values():
            state.planned = None if call is None else (int(call), int(rows))

    def layer_state(self, layer: int) -> _LayerState:
        """The accumulators of one MoE layer (grape.calibration.distributed reduces them across ranks)."""
        return self._states[layer]

    def state_dict(self) -> dict[int, dict]:
        return {layer: state.state_dict() for layer, state in self._states.items()}

    def load_state_dict(self, states: dict[int, dict], devices: dict[int, torch.device]) -> None:
        for layer, state in states.items():
            self._states[int(layer)].load_state_dict(state, devices[int(layer)])

    def release(self, layer: int) -> None:
        """Drop a layer's subsample rows once they are used (layer-sequential calibration)."""
        state = self._states[layer]
        state.samples, state.sample_calls = [], []

    def result(self, layer: int) -> LayerObservation:
        state = self._states[layer]
        if state.sums is None:
            raise ArchitectureError(
                f"layer {layer} saw no tokens while observed: its experts module was never "
                "called through ExpertsInterface. Run at least one forward inside the observer."
            )
        sums = state.sums.detach().cpu().numpy()
        stats = {name: sums[:, i].copy() for i, name in enumerate(_SUMMED)}
        stats["norm_max"] = state.norm_max.detach().cpu().numpy()
        energy = (
            float(state.energy.item()) / max(state.energy_tokens, 1)
            if state.energy is not None
            else 0.0
        )
        samples = torch.cat(state.samples) if state.samples else None
        return LayerObservation(
            layer=layer,
            stats=stats,
            output_energy=energy,
            tokens=state.energy_tokens,
            samples=samples,
        )

    def results(self) -> dict[int, LayerObservation]:
        return {layer: self.result(layer) for layer in sorted(self._states)}


def per_call_quota(sample_tokens: int, calls: int) -> int:
    """Rows to take per forward so that `calls` forwards fill `sample_tokens`."""
    return math.ceil(sample_tokens / max(calls, 1)) if sample_tokens > 0 else 0


def sample_plan(quota: int, per_call: int, available: list[int]) -> list[int]:
    """Subsample rows each call takes when calls fill `quota` in order, `per_call` at most each,
    call i having `available[i]` real rows: what the default (unplanned) observer takes, computed
    up front so that any rank can take call i's rows without having run the calls before it."""
    rows, taken = [], 0
    for count in available:
        want = max(0, min(per_call, quota - taken, count))
        rows.append(want)
        taken += want
    return rows
