"""Which stored tensors of a checkpoint hold routed experts, and what streaming apply makes of each.

Streaming apply (grape/pruning/streaming.py) never loads the weights, so it decides from the stored
tensors' names and shapes. The model built on the meta device says which of its tensors are
per-expert, and on which axis: the direct tensors of each MoE block, of its router and of its
experts module with the expert on dim 0 (what the adapters' surgery slices,
FusedMoEAdapter.keep_experts), plus those an adapter declares in `extra_expert_tensors`
(ERNIE-4.5's [1, E] correction bias in a router child, on axis 1).

A stored tensor is matched to the model tensor transformers loads it into by transformers' own
load renames, when they map it one to one (a converter that merges several stored tensors is
not one to one). Such a stored copy of a per-expert tensor, whatever its stored name (Granite's
`block_sparse_moe.input_linear.weight` is `experts.gate_up_proj`, EXAONE's
`mlp.e_score_correction_bias` is `mlp.gate.e_score_correction_bias`, MiniMax-M2's
`block_sparse_moe.e_score_correction_bias` is the block's own), must have the model tensor's
shape, and keeps the kept experts' slices of its expert axis: exactly what the in-memory path
keeps. Expert tensors that loading merges (one per expert, ``<P>.experts.N.<...>``) and
quantised companions no model tensor has (FP8 ``weight_scale_inv``, MXFP4 ``*_blocks`` /
``*_scales``) are recognised under the experts' stored prefix P instead (taken from the merged
keys, else from the router's key): per expert, renumbered or dropped; fused, sliced on dim 0.
Everything else is copied byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from grape.errors import PlanError
from grape.models.shards import StoredTensor

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_IN_MEMORY = "Pass --in-memory to load the model instead"


class StreamingError(PlanError):
    """A checkpoint whose expert tensors cannot be told apart or sliced."""


@dataclass(frozen=True)
class Sliced:
    """A stored copy of one per-expert model tensor."""

    module: str  # the model tensor's name
    axis: int  # its expert dimension
    expert_weights: bool  # a tensor of the experts module (not the router's or the block's)


@dataclass
class MoELayout:
    """Where one MoE layer's tensors are in the checkpoint, and which experts stay."""

    layer: int
    prefix: str | None  # stored key prefix of the MoE block (model.layers.3.mlp); None: unknown
    num_experts: int
    sliced: dict[str, Sliced]  # stored key -> the per-expert model tensor it holds
    keep: list[int] = field(default_factory=list)
    new_index: dict[int, int] = field(default_factory=dict)  # original expert -> kept position
    seen: set[int] = field(default_factory=set)


# -- stored keys and model tensors ----------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """The model tensor a stored key loads into."""

    name: str
    merged: bool  # a converter merges it with other stored tensors (e.g. one tensor per expert)


def loaded_names(model, keys: list[str]) -> dict[str, Loaded]:
    """Stored key -> the model tensor transformers loads it into (its load renames and
    converters), for the keys that load into a tensor the model has."""
    tensors = set(model.state_dict())  # names only: the model is on the meta device
    try:  # private transformers API (as grape.models.adapters.stored): without it, identical names
        from transformers.core_model_loading import rename_source_key

        from grape.models.adapters.stored import _renames

        renamings, converters = _renames(model)
    except (ImportError, AttributeError):
        return {key: Loaded(key, False) for key in keys if key in tensors}
    prefix = getattr(model, "base_model_prefix", None)
    present = dict.fromkeys(tensors, True)  # decides base-model-prefix handling, as loading does
    out = {}
    for key in keys:
        name, converter = rename_source_key(key, renamings, converters, prefix, present)
        if name in tensors:
            out[key] = Loaded(name, converter is not None)
    return out


def tensor_at(model, name: str):
    """The parameter or buffer `name` (dotted path) of `model`."""
    parent, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(parent), leaf)


def expert_axes(adapter, layer: int, module_names: dict[int, str]) -> dict[str, Sliced]:
    """Model tensor name -> (its expert axis, whether the experts module holds it), for every
    per-expert tensor of `layer`'s MoE block that surgery slices."""
    from grape.models.adapters.fused import _per_expert_tensors

    n = adapter.num_experts(layer)
    block = adapter.moe_blocks()[layer]
    out: dict[str, Sliced] = {}
    for module, weights in ((block, False), (adapter.router(layer), False), (adapter.experts(layer), True)):
        for local in _per_expert_tensors(module, n):
            name = f"{module_names[id(module)]}.{local}"
            out[name] = Sliced(name, 0, weights)
    for path, axis in type(adapter).extra_expert_tensors.items():
        name = f"{module_names[id(block)]}.{path}"
        tensor = tensor_at(block, path)
        if not -tensor.dim() <= axis < tensor.dim() or tensor.shape[axis] != n:
            raise StreamingError(f"layer {layer}: {name} has shape {list(tensor.shape)}, not "
                                 f"{n} experts on dimension {axis}; {_IN_MEMORY}")
        out[name] = Sliced(name, axis % tensor.dim(), False)
    return out


def refuse_undeclared(adapter, layer: int, declared: dict[str, Sliced], module_names: dict[int, str]) -> None:
    """A tensor of the MoE block with one value per expert that is not declared per-expert
    would be copied unsliced: a checkpoint that does not load, or routes wrongly. Refused."""
    n = adapter.num_experts(layer)
    block = adapter.moe_blocks()[layer]
    prefix = module_names[id(block)]
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        if f"{prefix}.{name}" not in declared and n > 1 and tensor.numel() == n:
            raise StreamingError(f"layer {layer}: {prefix}.{name} holds one value per expert but "
                                 "is not declared per-expert (the adapter's extra_expert_tensors); "
                                 f"streaming would copy it unsliced. {_IN_MEMORY}")


# -- the layouts ----------------------------------------------------------------------------
def expert_layouts(model, adapter, stored: dict[str, StoredTensor],
                   names: dict[str, Loaded]) -> dict[int, MoELayout]:
    """Every MoE layer's layout: its stored one-to-one copies of per-expert tensors (`names`:
    loaded_names of the checkpoint's keys), checked against the model's shapes, and the stored
    prefix of its block's experts."""
    module_names = {id(module): name for name, module in model.named_modules()}
    single: dict[str, list[str]] = {}  # model tensor -> the stored keys loaded one to one
    merged: dict[str, list[str]] = {}  # model tensor -> the stored keys merged into it
    for key, loaded in names.items():
        (merged if loaded.merged else single).setdefault(loaded.name, []).append(key)
    experts_at = {key[:key.rfind(".experts.")] for key in stored if ".experts." in key}
    persistent = set(model.state_dict())
    layouts: dict[int, MoELayout] = {}
    for layer in sorted(adapter.moe_blocks()):
        declared = expert_axes(adapter, layer, module_names)
        refuse_undeclared(adapter, layer, declared, module_names)
        sliced: dict[str, Sliced] = {}
        for name, info in declared.items():
            key = _only_key(name, single.get(name, []))
            if key is None:
                if not info.expert_weights and name in persistent:
                    raise StreamingError(f"{name} (one value per expert) is not in the checkpoint "
                                         f"under any name transformers loads it from; it cannot be "
                                         f"pruned shard by shard. {_IN_MEMORY}")
                continue  # stored one tensor per expert, or quantised: found by prefix
            shape = list(tensor_at(model, name).shape)
            if stored[key].shape != shape:
                raise StreamingError(f"{key}: stored with shape {stored[key].shape}, but it loads "
                                     f"into {name} of shape {shape}; {_IN_MEMORY}")
            sliced[key] = info
        router_weight = f"{module_names[id(adapter.router(layer))]}.weight"
        router_key = _only_key(router_weight, single.get(router_weight, []))
        prefix = _experts_prefix(layer, declared, merged, router_key, experts_at)
        layouts[layer] = MoELayout(layer, prefix, adapter.num_experts(layer), sliced)
    return layouts


def _only_key(name: str, keys: list[str]) -> str | None:
    """The one stored key that loads into `name`, or None; two would be sliced twice."""
    if len(keys) > 1:
        raise StreamingError(f"{' and '.join(sorted(keys))} all load into {name}; {_IN_MEMORY}")
    return keys[0] if keys else None


def _experts_prefix(layer: int, declared: dict[str, Sliced], merged: dict[str, list[str]],
                    router_key: str | None, experts_at: set[str]) -> str | None:
    """The stored prefix P of the layer's experts (`P.experts.`): what precedes `.experts.` in
    the keys loading merges into the experts module (Mixtral's model.layers.3.block_sparse_moe
    for model.layers.3.mlp); without such keys (experts stored fused, or quantised), the
    router weight's key without `<router>.weight`, where experts are stored under it
    (gpt-oss's MXFP4 blocks). None: no expert is stored under a prefix (Granite)."""
    found = {key[:key.rfind(".experts.")] for name, info in declared.items() if info.expert_weights
             for key in merged.get(name, []) if ".experts." in key}
    if len(found) > 1:
        raise StreamingError(f"layer {layer}: its experts are stored under "
                             f"{' and '.join(sorted(found))}; {_IN_MEMORY}")
    if found:
        return found.pop()
    beside = router_key.rsplit(".", 2)[0] if router_key else None
    return beside if beside in experts_at else None


# -- what each stored tensor becomes ----------------------------------------------------------
def pruned_tensors(stored: dict[str, StoredTensor], layouts: dict[int, MoELayout],
                   num_layers: int) -> tuple[list[StoredTensor], list[str]]:
    """(tensors of the pruned checkpoint, in stored order; names dropped as not part of the
    model). Stored copies of per-expert tensors keep the kept experts' slices; under a block's
    `<prefix>.experts.`, an index means one tensor per expert, anything else a fused tensor
    with the expert on dim 0."""
    sliced = {key: (layout, info) for layout in layouts.values() for key, info in layout.sliced.items()}
    blocks = {f"{layout.prefix}.experts.": layout for layout in layouts.values() if layout.prefix}
    out: list[StoredTensor] = []
    dropped: list[str] = []
    for name, tensor in stored.items():
        match = _LAYER.match(name)
        if match and int(match.group(1)) >= num_layers:
            dropped.append(name)
        elif name in sliced:
            layout, info = sliced[name]
            out.append(_take(tensor, layout, info.axis))
            if info.expert_weights:
                layout.seen.update(range(layout.num_experts))
        else:
            kept = _under_block(tensor, blocks)
            if kept is not None:
                out.append(kept)
    for layout in layouts.values():
        if layout.seen != set(range(layout.num_experts)):
            absent = sorted(set(range(layout.num_experts)) - layout.seen)
            where = f"{layout.prefix}.experts." if layout.prefix else "the MoE block"
            raise StreamingError(f"layer {layout.layer}: no tensors under {where} for experts "
                                 f"{absent[:5]} (of {layout.num_experts}); this checkpoint's expert "
                                 f"layout is not recognised. {_IN_MEMORY}")
    return out, dropped


def _under_block(tensor: StoredTensor, blocks: dict[str, MoELayout]) -> StoredTensor | None:
    """A tensor not loaded one to one: one expert's (renumbered, or None when dropped), a fused
    one's kept rows, or, outside every block's experts, the tensor itself."""
    name = tensor.name
    cut = name.find(".experts.")
    layout = blocks.get(name[:cut + len(".experts.")]) if cut >= 0 else None
    if layout is None:
        return tensor
    head, _, tail = name[cut + len(".experts."):].partition(".")
    if head.isdigit() and tail:
        return _per_expert(tensor, layout, int(head), tail)
    layout.seen.update(range(layout.num_experts))
    return _take(tensor, layout, 0)


def _take(tensor: StoredTensor, layout: MoELayout, axis: int) -> StoredTensor:
    if len(tensor.shape) <= axis or tensor.shape[axis] != layout.num_experts:
        raise StreamingError(f"{tensor.name}: expected {layout.num_experts} experts on dim {axis}, "
                             f"the tensor has shape {tensor.shape}; {_IN_MEMORY}")
    if layout.keep == list(range(layout.num_experts)):
        return tensor
    return tensor.take(layout.keep, axis)


def _per_expert(tensor: StoredTensor, layout: MoELayout, expert: int, tail: str) -> StoredTensor | None:
    if expert >= layout.num_experts:
        raise StreamingError(f"{tensor.name}: expert {expert} does not exist (layer {layout.layer} has "
                             f"{layout.num_experts} experts)")
    layout.seen.add(expert)
    new = layout.new_index.get(expert)
    if new is None:
        return None
    return tensor if new == expert else tensor.renamed(f"{layout.prefix}.experts.{new}.{tail}")


def check_shapes(model, adapter, layouts: dict[int, MoELayout], tensors: list[StoredTensor]) -> None:
    """Every streamed per-expert tensor has the shape apply_plan left the model's tensor, and
    every layer as many kept experts as the model's layer."""
    by_name = {t.name: t for t in tensors}
    for layer, layout in layouts.items():
        if len(layout.keep) != adapter.num_experts(layer):
            raise StreamingError(f"layer {layer}: {len(layout.keep)} experts streamed, but the pruned "
                                 f"layer has {adapter.num_experts(layer)}")
        for key, info in sorted(layout.sliced.items()):
            want = list(tensor_at(model, info.module).shape)
            if by_name[key].shape != want:
                raise StreamingError(f"{key}: streamed with shape {by_name[key].shape}, but the "
                                     f"pruned model's {info.module} has shape {want}")
