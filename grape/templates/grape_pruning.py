"""GRAPE's pruning metadata and the one hook that applies it to a freshly built model.

A checkpoint GRAPE wrote carries one block in config.json:

    "grape_pruning": {
        "version": 1,
        "method": "remove" | "merge" | "mask",
        "experts_per_layer": {"0": 24, "1": 30, ...},   # only when layers differ
        "top_k_per_layer": {"0": 4, ...},               # only when layers differ
        "masked_experts": {"3": [5, 9], ...}            # only for method "mask"
    }

Checkpoints written before the block existed used the top-level keys
`grape_experts_per_layer`, `grape_top_k_per_layer` and `grape_masked_experts`; they still load.

This file needs only torch, imported where a model is touched (reading the block needs nothing;
`grape inspect` uses it without torch), no GRAPE and no transformers: it is copied next to the remote-code
modeling file of a non-uniform or masked checkpoint, and GRAPE itself imports it, so
`from_pretrained(..., trust_remote_code=True)` and `grape.load` apply the same code.
"""

import types

BLOCK_KEY = "grape_pruning"
VERSION = 1
_LEGACY = {"experts_per_layer": "grape_experts_per_layer", "top_k_per_layer": "grape_top_k_per_layer",
           "masked_experts": "grape_masked_experts"}


def read_block(config) -> dict:
    """The pruning block of a config (object or dict), from `grape_pruning` or the legacy keys;
    empty maps when the model is not pruned."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    block = dict(get(BLOCK_KEY, None) or {})
    for key, legacy in _LEGACY.items():
        block[key] = {str(k): v for k, v in (block.get(key) or get(legacy, None) or {}).items()}
    block.setdefault("version", VERSION)
    block.setdefault("method", None)
    return block


def make_block(method, experts_per_layer: dict, top_k_per_layer: dict, masked: dict) -> dict:
    """The block to store: per-layer maps only when layers differ (uniform checkpoints keep the
    stock keys alone), masks only when there are any."""
    per_layer = len(set(experts_per_layer.values())) > 1 or len(set(top_k_per_layer.values())) > 1
    block = {"version": VERSION, "method": method}
    if per_layer:
        block["experts_per_layer"] = {str(k): int(v) for k, v in sorted(experts_per_layer.items())}
        block["top_k_per_layer"] = {str(k): int(v) for k, v in sorted(top_k_per_layer.items())}
    if masked:
        block["masked_experts"] = {str(k): [int(e) for e in v] for k, v in sorted(masked.items())}
    return block


# -- the hook -----------------------------------------------------------------------------------
def apply_block(config, moe_block, router_attr: str) -> bool:
    """The hook: give a freshly built model the pruned shape its config describes (shrink_layers)
    and its router masks (install_masks). `moe_block(layer)` returns a decoder layer's MoE block.
    Returns whether layers differ in size (then the stock balancing loss cannot be used)."""
    uneven = shrink_layers(config, moe_block, router_attr)
    install_masks(config, moe_block, router_attr)
    return uneven


def shrink_layers(config, moe_block, router_attr: str) -> bool:
    """Shrink each listed MoE layer to its count and top_k (before the weights are loaded)."""
    import torch

    block = read_block(config)
    top_ks = block["top_k_per_layer"]
    with torch.no_grad():
        for layer, count in sorted(block["experts_per_layer"].items(), key=lambda kv: int(kv[0])):
            moe = moe_block(int(layer))
            top_k = int(top_ks.get(layer, getattr(moe, router_attr).top_k))
            if count < int(moe.experts.num_experts) or top_k != int(getattr(moe, router_attr).top_k):
                shrink_layer(moe, router_attr, int(count), top_k)
    return bool(block["experts_per_layer"] or top_ks)


def install_masks(config, moe_block, router_attr: str) -> None:
    """Re-install the router masks of a checkpoint saved with method `mask`."""
    for layer, removed in read_block(config)["masked_experts"].items():
        router = getattr(moe_block(int(layer)), router_attr)
        gone = {int(r) for r in removed}
        keep = [e for e in range(int(router.num_experts)) if e not in gone]
        install_router_mask(router, keep, min(int(router.top_k), len(keep)))


def shrink_layer(block, router_attr: str, num_experts: int, top_k: int) -> None:
    """Keep the first `num_experts` rows of every per-expert tensor of the router and experts
    (placeholders before the checkpoint's weights load) and set the counts everyone reads."""
    from torch import nn

    router, experts = getattr(block, router_attr), block.experts
    old = int(experts.num_experts)
    # the block's own per-expert tensors too (MiniMax-M2 keeps its correction bias there)
    for module in (block, router, experts):
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == old:
                    sliced = tensor[:num_experts].clone()
                    store[name] = nn.Parameter(sliced, requires_grad=tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else sliced
    set_counts(block, router, experts, num_experts, top_k)


def set_counts(block, router, experts, num_experts: int, top_k: int) -> None:
    """Every experts backend and the router read these counts: a stale one mis-routes silently."""
    for module in (block, router, experts):
        if hasattr(module, "num_experts"):
            module.num_experts = num_experts
    for module in (block, router):
        if hasattr(module, "top_k"):
            module.top_k = top_k


# -- masked routers -----------------------------------------------------------------------------
def install_router_mask(router, keep: list, top_k: int) -> None:
    """Make `router` route only among `keep` (original numbering), weights untouched. Each call
    runs the router's own forward on a view holding the kept experts' rows, so the family's
    routing rule (softmax, sigmoid + correction bias, groups, renormalisation) is exactly kept;
    indices are mapped back to the original numbering and masked experts' logits are -inf. A
    bound method (not a closure), so a deep copy masks its own router."""
    router._grape_keep = [int(e) for e in keep]
    router._grape_top_k = int(top_k)
    router.forward = types.MethodType(masked_router_forward, router)


def masked_router_forward(self, hidden_states, *args, **kwargs):
    import torch

    cls = type(self)
    n_full = int(self.num_experts)
    keep_index = torch.tensor(self._grape_keep, dtype=torch.long, device=self.weight.device)
    view = object.__new__(cls)
    view.__dict__.update(self.__dict__)
    view.__dict__.pop("forward", None)
    for store in ("_parameters", "_buffers"):
        view.__dict__[store] = {
            name: (t.index_select(0, keep_index) if t is not None and t.dim() >= 1 and t.shape[0] == n_full else t)
            for name, t in getattr(self, store).items()
        }
    view.num_experts = len(self._grape_keep)
    view.top_k = self._grape_top_k
    # per-expert arguments (MiniMax-M2 passes the block's correction bias) are sliced alike
    args = [a.index_select(0, keep_index) if isinstance(a, torch.Tensor) and a.dim() == 1 and a.shape[0] == n_full
            else a for a in args]
    logits, weights, index = cls.forward(view, hidden_states, *args, **kwargs)
    full_logits = logits.new_full((*logits.shape[:-1], n_full), float("-inf"))
    full_logits[..., keep_index] = logits
    return full_logits, weights, keep_index[index]
