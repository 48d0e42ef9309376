"""Per-device memory caps: kept routed-expert bytes on each GPU stay within its cap, under a
pipeline (whole layers per device) or expert-parallel (experts spread over ranks) placement."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from solvers.constraints.base import Constraint, kept_mask, register_constraint
from solvers.constraints.units import format_bytes, over_cap
from solvers.errors import UserError


@register_constraint
class MemoryCap(Constraint):
    """Kept routed-expert bytes on each device stay within its cap, under a placement.

    ``placement`` is either ``{"layers": {device: [decoder layers]}}`` (pipeline parallel: each
    device holds whole layers) or ``{"experts": {decoder layer: [device of expert 0, 1, ...]}}``
    (expert parallel). ``caps`` maps device -> bytes (one number: the same cap for every device).
    """

    name: ClassVar[str] = "memory_cap"

    def __init__(self, caps, placement: dict):
        if set(placement) not in ({"layers"}, {"experts"}):
            raise UserError("memory cap placement must be {'layers': {...}} or {'experts': {...}}")
        self.kind = next(iter(placement))
        if self.kind == "layers":
            self.layers_of = {
                str(d): [int(layer) for layer in ls] for d, ls in placement["layers"].items()
            }
            self.devices = sorted(self.layers_of, key=_natural)
        else:
            self.device_of = {
                int(layer): [str(d) for d in ds] for layer, ds in placement["experts"].items()
            }
            self.devices = sorted({d for ds in self.device_of.values() for d in ds}, key=_natural)
        if isinstance(caps, dict):
            self.caps = {str(d): float(c) for d, c in caps.items()}
        else:
            self.caps = {d: float(caps) for d in self.devices}
        missing = [d for d in self.devices if d not in self.caps]
        if missing:
            raise UserError(f"memory cap: no cap given for devices {missing}")

    @classmethod
    def pipeline(cls, layer_indices: list[int], devices: int, cap) -> "MemoryCap":
        """Split the MoE layers into `devices` contiguous stages of near-equal size."""
        if devices < 1:
            raise UserError("pipeline parallel needs at least one device")
        stages = np.array_split(np.asarray(sorted(layer_indices)), devices)
        return cls(cap, {"layers": {str(d): s.tolist() for d, s in enumerate(stages)}})

    @classmethod
    def expert_parallel(cls, experts_per_layer: dict[int, int], devices: int, cap) -> "MemoryCap":
        """Expert e of every layer lives on device e * devices // N (contiguous blocks, as in EP)."""
        if devices < 1:
            raise UserError("expert parallel needs at least one device")
        return cls(
            cap,
            {
                "experts": {
                    layer: [str(e * devices // n) for e in range(n)]
                    for layer, n in experts_per_layer.items()
                }
            },
        )

    def to_json(self):
        placement = (
            {"layers": self.layers_of}
            if self.kind == "layers"
            else {"experts": {str(layer): ds for layer, ds in self.device_of.items()}}
        )
        return {"name": self.name, "caps": self.caps, "placement": placement}

    @classmethod
    def from_json(cls, data: dict) -> "MemoryCap":
        return cls(data["caps"], data["placement"])

    def __eq__(self, other):
        return isinstance(other, MemoryCap) and self.to_json() == other.to_json()

    def describe(self, problem):
        caps = sorted(set(self.caps.values()))
        cap_text = format_bytes(caps[0]) if len(caps) == 1 else "per-device caps"
        where = "pipeline stages" if self.kind == "layers" else "expert-parallel ranks"
        return f"memory cap {cap_text} on {len(self.devices)} {where}"

    def validate(self, problem):
        if self.kind == "layers":
            placed = [layer for ls in self.layers_of.values() for layer in ls]
            if sorted(placed) != problem.layer_indices:
                raise UserError(
                    "memory cap: the pipeline placement must list every MoE layer exactly "
                    f"once (MoE layers {problem.layer_indices[:6]}..., placed {sorted(placed)[:6]}...)"
                )
        else:
            for layer in problem.layers:
                if len(self.device_of.get(layer.index, [])) != layer.num_experts:
                    raise UserError(
                        f"memory cap: the expert placement of layer {layer.index} must list "
                        f"a device for each of its {layer.num_experts} experts"
                    )

    def needs_expert_level(self, problem):
        return self.kind == "experts" or not problem.uniform_bytes_per_layer

    def _members(self, problem, device):
        """[(position, expert mask on this device)] for one device."""
        out = []
        for p, layer in enumerate(problem.layers):
            if self.kind == "layers":
                if layer.index in self.layers_of[device]:
                    out.append((p, np.ones(layer.num_experts, bool)))
            else:
                mask = np.asarray(self.device_of[layer.index]) == device
                if mask.any():
                    out.append((p, mask))
        return out

    def add_to_model(self, form):
        for device in self.devices:
            members = self._members(form.problem, device)
            if not members:
                continue
            cols, vals = form.kept_bytes_terms([p for p, _ in members], {p: m for p, m in members})
            form.mip.add_row(cols, vals, -math.inf, self.caps[device])

    def kept_bytes(self, problem, masks) -> dict[str, float]:
        return {
            d: float(
                sum(
                    problem.layers[p].expert_bytes[m & masks[p]].sum()
                    for p, m in self._members(problem, d)
                )
            )
            for d in self.devices
        }

    def count_violations(self, problem, counts):
        if self.needs_expert_level(problem):
            return []
        masks = [np.arange(layer.num_experts) < counts[p] for p, layer in enumerate(problem.layers)]
        return self._over(problem, masks)

    def _over(self, problem, masks):
        used = self.kept_bytes(problem, masks)
        return [
            f"memory cap: device {d} holds {format_bytes(used[d])} of kept experts, above its cap "
            f"{format_bytes(self.caps[d])}"
            for d in self.devices
            if over_cap(used[d], self.caps[d])
        ]

    def check(self, plan, problem):
        masks = [kept_mask(plan, problem, p) for p in range(len(problem.layers))]
        return self._over(problem, masks)

    def precheck(self, problem, lo, hi):
        rules = problem.layer_rules()
        for device in self.devices:
            least = 0.0
            for p, mask in self._members(problem, device):
                b = problem.layers[p].expert_bytes
                forced = float(b[mask & rules[p].keep].sum())
                if self.kind == "layers":
                    forced = max(forced, float(np.sort(b)[: lo[p]].sum()))
                least += forced
            if over_cap(least, self.caps[device]):
                return (
                    f"memory cap: device {device} must hold at least {format_bytes(least)} of kept "
                    f"experts (per-layer minimums and must-keep), above its cap "
                    f"{format_bytes(self.caps[device])}"
                )
        return None


def _natural(text: str):
    return (0, int(text)) if str(text).isdigit() else (1, str(text))
