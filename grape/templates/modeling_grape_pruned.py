"""A model whose MoE layers keep different numbers of experts, written by GRAPE.

transformers builds every MoE layer with the one expert count in config.json; this subclass
builds the stock model, then shrinks each layer to the count listed in
`config.grape_experts_per_layer` (and `grape_top_k_per_layer`) before the weights are loaded,
so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` gives the pruned model
exactly. It needs only transformers, not GRAPE. (Without remote code: `grape.load_pruned(path)`.)
"""

import types

import torch
import transformers
from torch import nn

from .grape_moe_aux import install_uneven_aux_loss

# filled in by GRAPE when the checkpoint is written
BASE_ARCHITECTURE = "__GRAPE_BASE_ARCHITECTURE__"
ROUTER_ATTR = "__GRAPE_ROUTER_ATTR__"

_Base = getattr(transformers, BASE_ARCHITECTURE)


def _shrink_layer(block: nn.Module, num_experts: int, top_k: int) -> None:
    router, experts = getattr(block, ROUTER_ATTR), block.experts
    old = int(experts.num_experts)
    for module in (router, experts):
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == old:
                    sliced = tensor[:num_experts].clone()
                    store[name] = nn.Parameter(sliced, requires_grad=tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else sliced
    # every experts backend and the router read these counts
    for module in (block, router, experts):
        if hasattr(module, "num_experts"):
            module.num_experts = num_experts
    for module in (block, router):
        if hasattr(module, "top_k"):
            module.top_k = top_k


class GrapePrunedForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        counts = getattr(config, "grape_experts_per_layer", None) or {}
        top_ks = getattr(config, "grape_top_k_per_layer", None) or {}
        with torch.no_grad():
            for layer, count in counts.items():
                block = self.model.layers[int(layer)].mlp
                _shrink_layer(block, int(count), int(top_ks.get(layer, getattr(block, ROUTER_ATTR).top_k)))
        # experts saved with method "mask": weights kept, the router may never select them
        masked = getattr(config, "grape_masked_experts", None) or {}
        for layer, removed in masked.items():
            router = getattr(self.model.layers[int(layer)].mlp, ROUTER_ATTR)
            keep = [e for e in range(int(router.num_experts)) if e not in {int(r) for r in removed}]
            router._grape_keep = keep
            router._grape_top_k = min(int(router.top_k), len(keep))
            router.forward = types.MethodType(_masked_router_forward, router)
        if counts or top_ks:  # layers of different sizes: the stock balancing loss cannot cope
            install_uneven_aux_loss(self, ROUTER_ATTR)


def _masked_router_forward(self, hidden_states, *args, **kwargs):
    """The router's own forward on a view holding only the kept experts' rows; indices mapped
    back to the original numbering, masked experts' logits -inf."""
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
    logits, weights, index = cls.forward(view, hidden_states, *args, **kwargs)
    full_logits = logits.new_full((*logits.shape[:-1], n_full), float("-inf"))
    full_logits[..., keep_index] = logits
    return full_logits, weights, keep_index[index]
