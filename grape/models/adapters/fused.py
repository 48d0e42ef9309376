"""Shared adapter for transformers v5 MoE blocks: a router module plus a fused `XExperts` module.

Every supported family stores its routed experts as 3-D parameters with the expert on dim 0
(`gate_up_proj`, `down_proj`, optional biases) and a router whose per-expert tensors also
have the expert on dim 0 (`weight`, optional `bias`, optional `e_score_correction_bias`).
Families differ only in where the router lives, which config keys hold the expert count and
which routing rules constrain a plan; subclasses set those and nothing else.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from grape.models.adapters.base import PRUNING_KEY, MoEAdapter
from grape.models.adapters.stored import matches_memory, read_stored
from grape.errors import ArchitectureError
from grape.templates.grape_moe_aux import install_uneven_aux_loss
from grape.templates.grape_pruning import (
    install_masks,
    install_router_mask,
    make_block,
    set_counts,
    shrink_layers,
)
from solvers.scores import ModelIdentity


def _per_expert_tensors(module: nn.Module, num_experts: int) -> dict[str, torch.Tensor]:
    """Direct parameters and buffers of `module` indexed by expert on dim 0."""
    out = {}
    for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == num_experts:
            out[name] = tensor
    return out


def _replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _index(keep: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


class FusedMoEAdapter(MoEAdapter):
    """Adapter for `model.model.layers[i].mlp` blocks holding `<router_attr>` and `experts`."""

    # attribute of the MoE block that holds the router
    router_attr: ClassVar[str] = "gate"
    # attribute of the decoder layer that holds the MoE block (Llama-4 / Jamba: feed_forward,
    # Nemotron-H: mixer)
    block_attr: ClassVar[str] = "mlp"
    # config keys that carry the routed-expert count (all are written on save)
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")
    top_k_key: ClassVar[str] = "num_experts_per_tok"

    # -- structure ------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def moe_blocks(self) -> dict[int, nn.Module]:
        blocks = {}
        for idx, layer in enumerate(self.decoder_layers()):
            mlp = getattr(layer, self.block_attr, None)
            if mlp is not None and hasattr(mlp, "experts") and hasattr(mlp, self.router_attr):
                blocks[idx] = mlp
        return blocks

    def block(self, layer: int) -> nn.Module:
        blocks = self.moe_blocks()
        if layer not in blocks:
            raise ArchitectureError(
                f"decoder layer {layer} of this {self.config.model_type} model has no routed "
                f"experts; MoE layers are {sorted(blocks)}"
            )
        return blocks[layer]

    def router(self, layer: int) -> nn.Module:
        return getattr(self.block(layer), self.router_attr)

    def experts(self, layer: int) -> nn.Module:
        return self.block(layer).experts

    def num_experts(self, layer: int) -> int:
        return int(self.experts(layer).num_experts)

    def top_k(self, layer: int) -> int:
        router = self.router(layer)
        return int(getattr(router, "_grape_top_k", router.top_k))

    def router_masked(self, layer: int) -> bool:
        """Whether `mask_experts` replaced the router's forward (its projection is then only
        as wide as the kept experts, so no RemovalEffect describes it)."""
        return hasattr(self.router(layer), "_grape_keep")

    # -- computation ----------------------------------------------------------------------
    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the model's own router module: softmax / sigmoid / bias-corrected / group-limited
        # routing, renormalisation and scaling are whatever the family applies
        _, top_k_weights, top_k_index = self.router(layer)(hidden)
        return top_k_index, top_k_weights

    def expert_forward(self, layer: int, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        experts = self.experts(layer)
        transposed = bool(getattr(experts, "is_transposed", False))
        has_bias = bool(getattr(experts, "has_bias", False))

        def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = x @ weight if transposed else nn.functional.linear(x, weight)
            return out + bias if bias is not None else out

        gate_up = project(
            hidden,
            experts.gate_up_proj[expert],
            experts.gate_up_proj_bias[expert] if has_bias else None,
        )
        # `_apply_gate` is the family's own activation (concatenated or interleaved gate/up)
        gated = experts._apply_gate(gate_up)
        return project(gated, experts.down_proj[expert], experts.down_proj_bias[expert] if has_bias else None)

    def expert_bytes(self, layer: int) -> list[int]:
        n = self.num_experts(layer)
        per_expert = sum(
            t[0].numel() * t.element_size() for t in _per_expert_tensors(self.experts(layer), n).values()
        )
        return [int(per_expert)] * n

    # -- identity -------------------------------------------------------------------------
    def router_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """Router weight, bias and correction bias: every router tensor indexed by expert."""
        return _per_expert_tensors(self.router(layer), self.num_experts(layer))

    def fingerprint(self) -> str:
        """A hash of every router tensor, in float32. The tensors come from the checkpoint the
        model was loaded from when they still equal the in-memory ones (see
        grape.models.adapters.stored), so the same checkpoint has one fingerprint whatever dtype it
        was loaded in; otherwise (built in memory, changed since loading) from memory."""
        tensors = {
            (layer, name): tensor
            for layer in sorted(self.moe_blocks())
            for name, tensor in self.router_tensors(layer).items()
        }
        stored = self._stored_router_tensors(tensors)
        digest = hashlib.sha256()
        for layer in sorted(self.moe_blocks()):
            digest.update(f"layer{layer}".encode())
            for name in sorted(name for at, name in tensors if at == layer):
                source = (stored or tensors)[(layer, name)]
                array = source.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def _stored_router_tensors(
        self, tensors: dict[tuple[int, str], torch.Tensor]
    ) -> dict[tuple[int, str], torch.Tensor] | None:
        """The checkpoint's copies of `tensors`, or None unless every one is found and equal
        to the in-memory tensor after the load's cast."""
        module_names = {id(module): name for name, module in self.model.named_modules()}
        full = {
            key: f"{module_names.get(id(self.router(key[0])), '?')}.{key[1]}" for key in tensors
        }
        stored = read_stored(self.model, list(full.values()))
        if stored is None:
            return None
        out = {key: stored[name] for key, name in full.items()}
        if not all(matches_memory(out[key], tensors[key]) for key in tensors):
            return None
        return out

    def routing_groups(self) -> tuple[int | None, int | None]:
        """(n_group, topk_group) for group-limited routers, else (None, None)."""
        return None, None

    def identity(self) -> ModelIdentity:
        layers = sorted(self.moe_blocks())
        n_group, topk_group = self.routing_groups()
        return ModelIdentity(
            model_type=str(self.config.model_type),
            num_hidden_layers=int(self.config.num_hidden_layers),
            experts_per_layer={layer: self.num_experts(layer) for layer in layers},
            top_k={layer: self.top_k(layer) for layer in layers},
            fingerprint=self.fingerprint(),
            name_or_path=str(getattr(self.config, "_name_or_path", "") or ""),
            n_group=n_group,
            topk_group=topk_group,
        )

    # -- surgery --------------------------------------------------------------------------
    def _check_keep(self, layer: int, keep: list[int]) -> list[int]:
        n = self.num_experts(layer)
        keep = sorted(int(e) for e in keep)
        if not keep:
            raise ArchitectureError(f"layer {layer}: cannot remove every expert; keep at least one")
        if len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
            raise ArchitectureError(f"layer {layer}: experts to keep {keep} must be distinct indices in [0, {n})")
        return keep

    @torch.no_grad()
    def keep_experts(self, layer: int, keep: list[int]) -> None:
        keep = self._check_keep(layer, keep)
        if hasattr(self.router(layer), "_grape_keep"):
            raise ArchitectureError(f"layer {layer} is masked; remove experts from an unmasked model")
        n = self.num_experts(layer)
        kept = len(keep)
        top_k = min(self.top_k(layer), kept)
        block, router, experts = self.block(layer), self.router(layer), self.experts(layer)
        # the block's own per-expert tensors too (MiniMax-M2 keeps its correction bias there)
        for module in (block, router, experts):
            for name, tensor in _per_expert_tensors(module, n).items():
                # a fresh contiguous tensor so the removed experts' memory is freed
                _replace_tensor(module, name, tensor.index_select(0, _index(keep, tensor.device)).contiguous())
        # and the per-expert tensors the family declares elsewhere under the block (e.g.
        # ERNIE-4.5's [1, E] correction bias in a router child), along their declared axis: the
        # same declaration streaming apply slices the stored copies by
        for path, axis in type(self).extra_expert_tensors.items():
            owner, _, name = path.rpartition(".")
            module = block.get_submodule(owner)
            tensor = getattr(module, name)
            _replace_tensor(module, name, tensor.index_select(axis, _index(keep, tensor.device)).contiguous())
        set_counts(block, router, experts, kept, top_k)

    def mask_experts(self, layer: int, removed: list[int]) -> None:
        router = self.router(layer)
        n = self.num_experts(layer)
        previous = getattr(router, "_grape_keep", list(range(n)))
        keep = [e for e in previous if e not in {int(r) for r in removed}]
        self._check_keep(layer, keep)
        self.check_kept({layer: keep})
        install_router_mask(router, keep, top_k=min(router.top_k, len(keep)))

    def masked_experts(self) -> dict[int, list[int]]:
        """Layer -> experts the router is masked from selecting (empty when nothing is masked)."""
        out = {}
        for layer in sorted(self.moe_blocks()):
            keep = getattr(self.router(layer), "_grape_keep", None)
            if keep is not None:
                out[layer] = [e for e in range(self.num_experts(layer)) if e not in set(keep)]
        return out

    @torch.no_grad()
    def merge_experts(self, layer: int, groups: dict[int, list[int]], weights: dict[int, float]) -> None:
        experts = self.experts(layer)
        tensors = _per_expert_tensors(experts, self.num_experts(layer))
        for target, sources in groups.items():
            members = [int(target)] + [int(s) for s in sources if int(s) != int(target)]
            if len(members) == 1:
                continue
            w = torch.tensor([max(float(weights.get(m, 0.0)), 0.0) for m in members], dtype=torch.float64)
            # experts nobody routed to carry no information about their importance: plain mean
            w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(members))
            for tensor in tensors.values():
                stacked = tensor[members].to(torch.float64)
                merged = (w.to(stacked.device).view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)
                tensor[int(target)] = merged.to(tensor.dtype)

    @torch.no_grad()
    def expert_weight_cosine(self, layer: int) -> torch.Tensor:
        """[E, E] cosine similarity of the experts' flattened parameters, in fp64. Accumulated
        as a Gram matrix over column chunks, so no fp32 copy of a whole layer is ever made."""
        n = self.num_experts(layer)
        gram = None
        for _, tensor in sorted(_per_expert_tensors(self.experts(layer), n).items()):
            flat = tensor.detach().reshape(n, -1)
            step = max(1, (1 << 24) // n)
            for start in range(0, flat.shape[1], step):
                chunk = flat[:, start:start + step].to(torch.float64)
                part = chunk @ chunk.T
                gram = part if gram is None else gram + part.to(gram.device)
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return (gram / norms[:, None] / norms[None, :]).cpu()

    # -- plan rules -----------------------------------------------------------------------
    def check_plan_counts(self, kept_counts: dict[int, int]) -> None:
        for layer, count in kept_counts.items():
            if count < 1:
                raise ArchitectureError(f"layer {layer}: a plan must keep at least one expert per layer")

    # -- config ---------------------------------------------------------------------------
    def sync_config(self) -> None:
        """Write the model's current per-layer expert counts, top_k and masks into its config:
        the stock keys hold the largest count and top_k (equal counts: a vanilla checkpoint),
        and the `grape_pruning` block (grape/templates/grape_pruning.py) the method and, when
        layers differ or experts are masked, the per-layer values the load hook applies."""
        layers = sorted(self.moe_blocks())
        counts = {layer: self.num_experts(layer) for layer in layers}
        top_ks = {layer: int(self.router(layer).top_k) for layer in layers}
        for key in self.expert_count_keys:
            setattr(self.config, key, max(counts.values()))
        setattr(self.config, self.top_k_key, max(top_ks.values()))
        for legacy in ("grape_experts_per_layer", "grape_top_k_per_layer", "grape_masked_experts"):
            if hasattr(self.config, legacy):  # written by GRAPE before the block existed
                delattr(self.config, legacy)
        method = getattr(self.model, "grape_applied_method", None) or \
            (getattr(self.config, PRUNING_KEY, None) or {}).get("method")
        setattr(self.config, PRUNING_KEY, make_block(method, counts, top_ks, self.masked_experts()))
        self.sync_runtime()

    def sync_runtime(self) -> None:
        """Make the causal-LM wrapper agree with its layers: the stock load-balancing loss reads
        `num_experts` / `num_experts_per_tok` cached on the wrapper at construction, and cannot
        handle layers of different sizes at all, so those get a per-layer loss instead
        (templates/grape_moe_aux.py)."""
        layers = sorted(self.moe_blocks())
        counts = {self.num_experts(layer) for layer in layers}
        top_ks = {int(self.router(layer).top_k) for layer in layers}
        if hasattr(self.model, "num_experts"):
            self.model.num_experts = max(counts)
        if hasattr(self.model, "num_experts_per_tok"):
            self.model.num_experts_per_tok = max(top_ks)
        if len(counts) > 1 or len(top_ks) > 1:
            install_uneven_aux_loss(self.model, self.router_attr, self.block_attr)

    def shrink_to_config(self) -> None:
        """Give a freshly built model (any device, incl. meta) the per-layer counts its config
        lists, so a non-uniform checkpoint's weights fit: the same hook the remote-code class
        runs (grape/templates/grape_pruning.py). Weights are placeholders until loaded."""
        shrink_layers(self.config, self.block, self.router_attr)

    def mask_from_config(self) -> None:
        """Re-install the router masks listed in the config (a checkpoint saved after `mask`)."""
        install_masks(self.config, self.block, self.router_attr)


