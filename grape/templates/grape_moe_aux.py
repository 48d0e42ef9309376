"""The router load-balancing loss for MoE models whose layers keep different numbers of experts.

transformers' `load_balancing_loss_func` sums expert counts over all layers in one vector of
`config.num_experts` entries, so `output_router_logits=True` fails on a model pruned to
per-layer counts. `install_uneven_aux_loss(model, router_attr, block_attr)` makes such a model
compute the Switch-Transformer loss per layer instead (each layer's own expert count) and
average it over the MoE layers: the routers are the `router_attr` of each decoder layer's
`block_attr` (the MoE block the family's adapter declares: `mlp`, or `block_sparse_moe`,
`feed_forward`, `mixer`). The model's output then carries `aux_loss` and `router_logits` as
usual and the loss includes `router_aux_loss_coef * aux_loss` when labels are given.

Only torch is needed: GRAPE uses this file directly and copies it next to the remote-code
`modeling_grape_pruned.py` of non-uniform checkpoints.
"""

import torch
import torch.nn.functional as F

_HOOKS_ATTR = "_grape_uneven_aux_hooks"


def uneven_load_balancing_loss(router_logits, top_ks, attention_mask=None) -> torch.Tensor:
    """Mean over layers of E_l * sum_i f_{l,i} * P_{l,i}: f = top-k assignments to expert i
    per token, P = its mean router probability (padding excluded). Per layer this is exactly
    transformers' loss for that layer alone (top_k when routing is perfectly balanced), so
    `router_aux_loss_coef` keeps its meaning."""
    device = router_logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    losses = []
    for logits, top_k in zip(router_logits, top_ks):
        logits = logits.reshape(-1, logits.shape[-1]).to(device)
        num_experts = logits.shape[-1]
        probs = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        counts = torch.zeros(num_experts, device=device).scatter_add_(
            0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        rows = weight.sum().clamp_min(1.0)
        fraction = counts / rows
        mean_prob = (probs * weight.unsqueeze(-1)).sum(dim=0) / rows
        losses.append(num_experts * torch.sum(fraction * mean_prob))
    return torch.stack(losses).mean()


def _moe_routers(model, router_attr, block_attr):
    routers = []
    for layer in model.model.layers:
        block = getattr(layer, block_attr, None)
        router = getattr(block, router_attr, None) if block is not None else None
        if router is not None and hasattr(router, "top_k") and hasattr(block, "experts"):
            routers.append(router)
    return routers


def install_uneven_aux_loss(model, router_attr: str, block_attr: str = "mlp") -> bool:
    """Replace the stock load-balancing loss of `model` by the per-layer one (idempotent).
    Families without a load-balancing loss (no `router_aux_loss_coef`) are left alone.
    Returns whether hooks are installed."""
    if getattr(model, _HOOKS_ATTR, None) is not None:
        return True
    if not hasattr(model, "router_aux_loss_coef"):
        return False
    routers = _moe_routers(model, router_attr, block_attr)
    state = {"active": False, "logits": []}

    def record(module, args, output):
        if state["active"]:
            state["logits"].append(output[0] if isinstance(output, tuple) else output)

    def before(module, args, kwargs):
        want = kwargs.get("output_router_logits")
        if want is None:
            want = getattr(module.config, "output_router_logits", False)
        state["active"], state["logits"] = bool(want), []
        if want:  # the stock loss would fail on uneven layers: record the logits ourselves
            return args, {**kwargs, "output_router_logits": False}
        return None

    def after(module, args, kwargs, output):
        if not state["active"]:
            return None
        state["active"] = False
        logits, state["logits"] = tuple(state["logits"]), []
        if not hasattr(output, "keys") or not logits:  # return_dict=False: leave the tuple as is
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        aux = uneven_load_balancing_loss(logits, [int(r.top_k) for r in routers], mask)
        output["router_logits"] = logits
        output["aux_loss"] = aux
        if output.get("loss") is not None:
            output["loss"] = output["loss"] + module.router_aux_loss_coef * aux.to(output["loss"].device)
        return output

    handles = [r.register_forward_hook(record) for r in routers]
    handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
    handles.append(model.register_forward_hook(after, with_kwargs=True))
    setattr(model, _HOOKS_ATTR, handles)
    return True
