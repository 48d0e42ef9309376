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
        if devices > len(layer_indices):
            raise UserError(
                f"--pipeline {devices}: more pipeline devices than the model's "
                f"{len(layer_indices)} MoE layers (each device holds whole layers)"
            )
        cap = _per_device(cap, devices, "--pipeline")
        stages = np.array_split(np.asarray(sorted(layer_indices)), devices)
        return cls(cap, {"layers": {str(d): s.tolist() for d, s in enumerate(stages)}})

    @classmethod
    def expert_parallel(cls, experts_per_layer: dict[int, int], devices: int, cap) -> "MemoryCap":
        """Expert e of every layer lives on device e * devices // N (contiguous blocks, as in EP)."""
        if devices < 1:
            raise UserError("expert parallel needs at least one device")
        fewest = min(experts_per_layer.values(), default=0)
        if devices > fewest:
            raise UserError(
                f"--expert-parallel {devices}: more expert-parallel ranks than the {fewest} "
                "experts of a layer (every rank needs at least one expert of each layer)"
            )
        cap = _per_device(cap, devices, "--expert-parallel")
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

    def placement_table(self, problem, masks) -> list[dict]:
        """One row per device: {"device": i, "layers": [...], "bytes": kept bytes, "cap": bytes}
        (devices numbered 0.. in their natural order; what a plan records as ``placement``)."""
        used = self.kept_bytes(problem, masks)
        return [
            {
                "device": i,
                "layers": [problem.layers[p].index for p, _ in self._members(problem, d)],
                "bytes": int(round(used[d])),
                "cap": int(math.floor(self.caps[d])),
            }
            for i, d in enumerate(self.devices)
        ]

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
        if self.kind == "layers":
            return self._budget_precheck(problem, lo, hi)
        return None

    # -- how many experts the devices can hold (pipeline placements) ---------------------------
    def _device_sizes(self, problem, lo, hi, device):
        """(bytes that must stay: each layer's cheapest lo experts, forced count, the bytes of the
        further experts the device could keep, cheapest first)."""
        floor_bytes, floor_count, extra = 0.0, 0, []
        for p, _ in self._members(problem, device):
            b = np.sort(problem.layers[p].expert_bytes)
            floor_bytes += float(b[: lo[p]].sum())
            floor_count += int(lo[p])
            extra.append(b[lo[p]: hi[p]])
        extra = np.sort(np.concatenate(extra)) if extra else np.zeros(0)
        return floor_bytes, floor_count, np.cumsum(extra)

    def most_kept(self, problem, lo, hi, scale: float = 1.0) -> dict[str, int]:
        """Per device: the most experts it can keep within scale x its cap (per-layer bounds
        lo..hi, the cheapest experts first). Their sum bounds every plan's kept total."""
        out = {}
        for device in self.devices:
            floor_bytes, floor_count, extra = self._device_sizes(problem, lo, hi, device)
            cap = scale * self.caps[device]
            room = cap + 1e-9 * max(1.0, abs(cap)) - floor_bytes  # the slack of over_cap
            out[device] = floor_count + int(np.searchsorted(extra, room, "right"))
        return out

    def _budget_precheck(self, problem, lo, hi):
        k = problem.budget.kept_total(problem)
        if k is None:
            return None
        most = self.most_kept(problem, lo, hi)
        if k <= sum(most.values()):
            return None
        # the binding device: the one whose even share of the kept experts it misses by most
        total = sum(problem.layers[p].num_experts for d in self.devices for p, _ in self._members(problem, d))
        worst = None
        for device in self.devices:
            members = self._members(problem, device)
            share = round(k * sum(problem.layers[p].num_experts for p, _ in members) / total)
            if worst is None or share - most[device] > worst[0]:
                floor_bytes, floor_count, extra = self._device_sizes(problem, lo, hi, device)
                more = min(max(share - floor_count, 0), len(extra))
                need = floor_bytes + (float(extra[more - 1]) if more else 0.0)
                layers = [problem.layers[p].index for p, _ in members]
                worst = (share - most[device], device, layers, share, need)
        lo_s, hi_s = 0.0, 1.0
        while sum(self.most_kept(problem, lo, hi, hi_s).values()) < k:
            hi_s *= 2
        for _ in range(60):
            mid = (lo_s + hi_s) / 2
            lo_s, hi_s = (lo_s, mid) if sum(self.most_kept(problem, lo, hi, mid).values()) >= k else (mid, hi_s)
        caps = sorted({format_bytes(hi_s * c) for c in self.caps.values()})
        deficit, device, layers, share, need = worst
        span = f"{layers[0]}-{layers[-1]}" if layers else "none"
        binding = (
            f"; device {device} (layers {span}) would keep {share} of them, at least "
            f"{format_bytes(need)} of routed experts, but holds {most[device]} within its cap "
            f"{format_bytes(self.caps[device])}" if deficit > 0 else ""
        )
        return (
            f"memory cap: the budget keeps {k} experts, but the {len(self.devices)} devices hold at "
            f"most {sum(most.values())} within their caps{binding}. Remove at least {problem.total_experts - sum(most.values())} "
            f"experts (--budget {problem.total_experts - sum(most.values())}), or give the devices at "
            f"least {' / '.join(caps)} each ({hi_s:.3f} x the caps)"
        )


def _per_device(cap, devices: int, flag: str):
    """One cap for every device, or a list with one cap per device -> what the class takes."""
    if isinstance(cap, (list, tuple)):
        if len(cap) != devices:
            raise UserError(
                f"--memory-cap lists {len(cap)} caps but {flag} {devices} places "
                f"{devices} devices; give one cap per device or a single size"
            )
        return {str(d): float(c) for d, c in enumerate(cap)}
    return cap


def _natural(text: str):
    return (0, int(text)) if str(text).isdigit() else (1, str(text))
