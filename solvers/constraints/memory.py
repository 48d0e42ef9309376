"""Per-device memory caps: what each GPU holds stays within its cap, under a pipeline (whole
layers per device) or expert-parallel (experts spread over ranks) placement.

A device holds its kept routed experts plus, when the scores record the model's sizes
(solvers.sizes), the other parts of its layers, the embeddings and head where they live, and
the KV cache of ``--max-seq-len`` x ``--batch`` tokens (:func:`solvers.sizes.device_parts`).
Those are fixed by the placement, so each cap becomes a cap on the kept expert bytes:
``sum_{e on d} bytes_e x_e <= cap_d - fixed_d``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar

import numpy as np

from solvers.constraints.base import Constraint, kept_mask, register_constraint
from solvers.constraints.units import format_bytes, over_cap
from solvers.errors import UserError
from solvers.sizes import device_parts


@register_constraint
class MemoryCap(Constraint):
    """Everything on each device stays within its cap, under a placement.

    ``placement`` is either ``{"layers": {device: [decoder layers]}}`` (pipeline parallel: each
    device holds whole layers) or ``{"experts": {decoder layer: [device of expert 0, 1, ...]}}``
    (expert parallel). ``caps`` maps device -> bytes (one number: the same cap for every device).
    ``kv``: ``{"max_seq_len": T, "batch": B}`` to count the KV cache, or None.
    """

    name: ClassVar[str] = "memory_cap"

    def __init__(self, caps, placement: dict, kv: dict | None = None):
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
        self.kv = None if not kv else {"max_seq_len": int(kv["max_seq_len"]),
                                       "batch": int(kv.get("batch") or 1)}

    @classmethod
    def pipeline(cls, layer_indices: list[int], devices: int, cap, kv: dict | None = None,
                 stages: list[list[int]] | None = None) -> MemoryCap:
        """Split the MoE layers into `devices` contiguous stages: `stages` when given (e.g.
        :func:`balanced_stages`), else of near-equal size."""
        if devices < 1:
            raise UserError("pipeline parallel needs at least one device")
        if devices > len(layer_indices):
            raise UserError(
                f"--pipeline {devices}: more pipeline devices than the model's "
                f"{len(layer_indices)} MoE layers (each device holds whole layers)"
            )
        cap = _per_device(cap, devices, "--pipeline")
        if stages is None:
            stages = [s.tolist() for s in np.array_split(np.asarray(sorted(layer_indices)), devices)]
        return cls(cap, {"layers": {str(d): list(s) for d, s in enumerate(stages)}}, kv)

    @classmethod
    def expert_parallel(cls, experts_per_layer: dict[int, int], devices: int, cap,
                        kv: dict | None = None) -> MemoryCap:
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
        placement = {layer: [str(e * devices // n) for e in range(n)]
                     for layer, n in experts_per_layer.items()}
        return cls(cap, {"experts": placement}, kv)

    def to_json(self):
        placement = (
            {"layers": self.layers_of}
            if self.kind == "layers"
            else {"experts": {str(layer): ds for layer, ds in self.device_of.items()}}
        )
        out = {"name": self.name, "caps": self.caps, "placement": placement}
        return {**out, "kv": self.kv} if self.kv else out

    @classmethod
    def from_json(cls, data: dict) -> MemoryCap:
        return cls(data["caps"], data["placement"], data.get("kv"))

    def __eq__(self, other):
        return isinstance(other, MemoryCap) and self.to_json() == other.to_json()

    def describe(self, problem):
        caps = sorted(set(self.caps.values()))
        cap_text = format_bytes(caps[0]) if len(caps) == 1 else "per-device caps"
        where = "pipeline stages" if self.kind == "layers" else "expert-parallel ranks"
        kv = (f", KV cache of {self.kv['batch']} x {self.kv['max_seq_len']} tokens"
              if self.kv else "")
        return f"memory cap {cap_text} on {len(self.devices)} {where}{kv}"

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
        footprint = getattr(problem, "footprint", None)
        if self.kv and (footprint is None or footprint.kv is None):
            raise UserError("--max-seq-len needs the attention shape, which this scores file does "
                            "not record; re-run `grape calibrate` (scores format version 2)")

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

    # -- what a device holds besides its routed experts ------------------------------------------
    def parts(self, problem) -> dict[str, tuple[float, float]]:
        """Per device: (other parts, KV cache) in bytes; zeros when the scores record only the
        routed experts."""
        footprint = getattr(problem, "footprint", None)
        if footprint is None:
            return {d: (0.0, 0.0) for d in self.devices}
        stages = self.layers_of if self.kind == "layers" else None
        return device_parts(footprint, self.devices, stages, self.kv)

    def _fixed(self, problem) -> dict[str, float]:
        return {d: other + kv for d, (other, kv) in self.parts(problem).items()}

    def add_to_model(self, form):
        fixed = self._fixed(form.problem)
        for device in self.devices:
            members = self._members(form.problem, device)
            if not members:
                continue
            cols, vals = form.kept_bytes_terms([p for p, _ in members], {p: m for p, m in members})
            form.mip.add_row(cols, vals, -math.inf, self.caps[device] - fixed[device])

    def kept_bytes(self, problem, masks) -> dict[str, float]:
        """Per device: the bytes of its kept routed experts."""
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
        """One row per device (devices numbered 0.. in their natural order; what a plan records
        as ``placement``): {"device": i, "layers": [MoE layers], "bytes": all it holds, "cap":
        bytes, "experts": kept routed-expert bytes, "other": other parts, "kv": KV cache}."""
        used, parts = self.kept_bytes(problem, masks), self.parts(problem)
        rows = []
        for i, d in enumerate(self.devices):
            experts, other, kv = (round(v) for v in (used[d], *parts[d]))
            rows.append({"device": i,
                         "layers": [problem.layers[p].index for p, _ in self._members(problem, d)],
                         "bytes": experts + other + kv, "cap": int(math.floor(self.caps[d])),
                         "experts": experts, "other": other, "kv": kv})
        return rows

    def count_violations(self, problem, counts):
        if self.needs_expert_level(problem):
            return []
        masks = [np.arange(layer.num_experts) < counts[p] for p, layer in enumerate(problem.layers)]
        return self._over(problem, masks)

    def _over(self, problem, masks):
        used, parts = self.kept_bytes(problem, masks), self.parts(problem)
        out = []
        for d in self.devices:
            other, kv = parts[d]
            if over_cap(used[d] + other + kv, self.caps[d]):
                rest = f" plus {format_bytes(other + kv)} of other parts and KV cache" if other + kv else ""
                out.append(f"memory cap: device {d} holds {format_bytes(used[d])} of kept experts"
                           f"{rest}, above its cap {format_bytes(self.caps[d])}")
        return out

    def check(self, plan, problem):
        masks = [kept_mask(plan, problem, p) for p in range(len(problem.layers))]
        return self._over(problem, masks)

    # -- infeasibility, with numbers and the smallest fix -----------------------------------------
    def _least(self, problem, lo, device) -> float:
        """The fewest expert bytes the device can keep: must-keep experts and, on a pipeline
        stage, each layer's cheapest lo experts."""
        rules, least = problem.layer_rules(), 0.0
        for p, mask in self._members(problem, device):
            b = problem.layers[p].expert_bytes
            forced = float(b[mask & rules[p].keep].sum())
            if self.kind == "layers":
                forced = max(forced, float(np.sort(b)[: lo[p]].sum()))
            least += forced
        return least

    def precheck(self, problem, lo, hi):
        parts = self.parts(problem)
        for device in self.devices:
            least, (other, kv) = self._least(problem, lo, device), parts[device]
            if over_cap(least + other + kv, self.caps[device]):
                layers = [problem.layers[p].index for p, _ in self._members(problem, device)]
                holds = _holding(other, kv)
                return (f"memory cap: device {device} (layers {_span(layers)})"
                        + (f" holds {holds};" if holds else ":")
                        + f" even at the per-layer minimum (and must-keep) its experts need "
                        f"{format_bytes(least)} > {_room(self.caps[device], other + kv)}; "
                        f"{self._remedy(problem, lo, hi, None)}")
        if self.kind == "layers":
            return self._budget_precheck(problem, lo, hi)
        return None

    def _device_sizes(self, problem, lo, hi, device):
        """(bytes that must stay: each layer's cheapest lo experts, forced count, the cumulative
        bytes of the further experts the device could keep, cheapest first)."""
        floor_bytes, floor_count, extra = 0.0, 0, []
        for p, _ in self._members(problem, device):
            b = np.sort(problem.layers[p].expert_bytes)
            floor_bytes += float(b[: lo[p]].sum())
            floor_count += int(lo[p])
            extra.append(b[lo[p]: hi[p]])
        extra = np.sort(np.concatenate(extra)) if extra else np.zeros(0)
        return floor_bytes, floor_count, np.cumsum(extra)

    def most_kept(self, problem, lo, hi, scale: float = 1.0) -> dict[str, int]:
        """Per device: the most experts it can keep within scale x its cap less what else it
        holds (per-layer bounds lo..hi, the cheapest experts first). Their sum bounds every
        plan's kept total."""
        out, fixed = {}, self._fixed(problem)
        for device in self.devices:
            floor_bytes, floor_count, extra = self._device_sizes(problem, lo, hi, device)
            cap = scale * self.caps[device]
            room = cap + 1e-9 * max(1.0, abs(cap)) - fixed[device] - floor_bytes  # over_cap's slack
            out[device] = floor_count + int(np.searchsorted(extra, room, "right"))
        return out

    def _fits(self, problem, lo, hi, k: int | None, scale: float = 1.0) -> bool:
        """Every device holds its least within scale x its cap, and (pipeline, count budget)
        the devices hold at least k experts together."""
        fixed = self._fixed(problem)
        if any(over_cap(self._least(problem, lo, d) + fixed[d], scale * self.caps[d])
               for d in self.devices):
            return False
        if self.kind != "layers" or k is None:
            return True
        return sum(self.most_kept(problem, lo, hi, scale).values()) >= k

    def _remedy(self, problem, lo, hi, k: int | None) -> str:
        """The smallest common scale of the caps that fits, and the fewest devices of these caps
        that would (same kind of placement), in words."""
        hi_s = 1.0
        for _ in range(64):
            if self._fits(problem, lo, hi, k, hi_s):
                break
            hi_s *= 2
        else:
            return "no cap makes this fit; relax the per-layer rules or the budget"
        lo_s = 0.0
        for _ in range(50):
            mid = (lo_s + hi_s) / 2
            lo_s, hi_s = (lo_s, mid) if self._fits(problem, lo, hi, k, mid) else (mid, hi_s)
        caps = " / ".join(sorted({format_bytes(hi_s * c) for c in self.caps.values()}))
        text = f"give the devices at least {caps} each ({hi_s:.3f} x the caps)"
        more = self._fewest_devices(problem, lo, hi, k)
        if more is not None:
            flag = "--pipeline" if self.kind == "layers" else "--expert-parallel"
            text += f", or use at least {more} devices of this cap ({flag} {more}, or --fit {more}xSIZE)"
        return text

    def _fewest_devices(self, problem, lo, hi, k: int | None) -> int | None:
        """The fewest devices of this one cap (standard placement) that fit, or None."""
        caps = set(self.caps.values())
        if len(caps) != 1:
            return None
        cap = caps.pop()
        if self.kind == "layers":
            limit, build = len(problem.layers), partial(MemoryCap.pipeline, problem.layer_indices)
        else:
            experts = {layer.index: layer.num_experts for layer in problem.layers}
            limit, build = min(experts.values()), partial(MemoryCap.expert_parallel, experts)
        for n in range(len(self.devices) + 1, limit + 1):
            if build(n, cap, self.kv)._fits(problem, lo, hi, k):
                return n
        return None

    def _budget_precheck(self, problem, lo, hi):
        k = problem.budget.kept_total(problem)
        if k is None:
            return None
        most = self.most_kept(problem, lo, hi)
        if k <= sum(most.values()):
            return None
        binding = self._binding(problem, lo, hi, k, most)
        removals = problem.total_experts - sum(most.values())
        return (
            f"memory cap: the budget keeps {k} experts, but the {len(self.devices)} devices hold at "
            f"most {sum(most.values())} within their caps{binding}. Remove at least {removals} "
            f"experts (--budget {removals}), or {self._remedy(problem, lo, hi, k)}"
        )

    def _binding(self, problem, lo, hi, k: int, most: dict[str, int]) -> str:
        """The device that misses its even share of the k kept experts by most, in words."""
        total = sum(problem.layers[p].num_experts for d in self.devices for p, _ in self._members(problem, d))
        parts, worst = self.parts(problem), None
        for device in self.devices:
            members = self._members(problem, device)
            share = round(k * sum(problem.layers[p].num_experts for p, _ in members) / total)
            if worst is None or share - most[device] > worst[0]:
                floor_bytes, floor_count, extra = self._device_sizes(problem, lo, hi, device)
                more = min(max(share - floor_count, 0), len(extra))
                need = floor_bytes + (float(extra[more - 1]) if more else 0.0)
                layers = [problem.layers[p].index for p, _ in members]
                worst = (share - most[device], device, layers, share, need)
        deficit, device, layers, share, need = worst
        if deficit <= 0:
            return ""
        other, kv = parts[device]
        holds = _holding(other, kv)
        return (f"; device {device} (layers {_span(layers)}) would keep {share} of them, at least "
                f"{format_bytes(need)} of routed experts, but " + (f"beside {holds} it " if holds else "")
                + f"holds {most[device]} within {_room(self.caps[device], other + kv)}")


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers else "none"


def _holding(other: float, kv: float) -> str:
    """'9.10 GiB of other parts (attention, ...) and 2.00 GiB of KV cache', or ''."""
    if not other and not kv:
        return ""
    cache = f" and {format_bytes(kv)} of KV cache" if kv else ""
    return (f"{format_bytes(other)} of other parts (attention, norms, router, shared experts, "
            f"embeddings/head){cache}")


def _room(cap: float, fixed: float) -> str:
    """'its cap 80 GB' or 'its cap 80 GB - 9.1 GB'."""
    return f"its cap {format_bytes(cap)}" + (f" - {format_bytes(fixed)}" if fixed else "")


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


def balanced_stages(layers: list[int], devices: int, weights: list[float], first: float = 0.0,
                    last: float = 0.0) -> list[list[int]]:
    """`devices` contiguous, non-empty ranges of `layers` (in order) minimising the largest
    range's weight, where the first range also carries `first` (embeddings) and the last `last`
    (head): the linear-partition dynamic program, O(L^2 D)."""
    n = len(layers)
    if not 1 <= devices <= n:
        raise UserError(f"cannot place {n} MoE layers on {devices} pipeline devices")
    prefix = np.concatenate([[0.0], np.cumsum(weights)])

    def cost(i: int, j: int) -> float:  # layers[i:j] as one stage
        return prefix[j] - prefix[i] + (first if i == 0 else 0.0) + (last if j == n else 0.0)

    best = np.full((devices + 1, n + 1), np.inf)
    cut = np.zeros((devices + 1, n + 1), dtype=int)
    best[0][0] = 0.0
    for d in range(1, devices + 1):
        for j in range(d, n - (devices - d) + 1):
            for i in range(d - 1, j):
                value = max(best[d - 1][i], cost(i, j))
                if value < best[d][j]:
                    best[d][j], cut[d][j] = value, i
    bounds, j = [], n
    for d in range(devices, 0, -1):
        bounds.append((cut[d][j], j))
        j = cut[d][j]
    return [layers[i:j] for i, j in reversed(bounds)]
