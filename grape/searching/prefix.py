"""Measure many plans on the same tokens without recomputing what they share.

Two plans that keep the same experts in decoder layers 0..j-1 send the same hidden states into
layer j, so the second one needs only layers j.. of the forward pass. The loss-verified search
measures exactly such plans: a level switch changes two layers of the incumbent, a per-layer
criterion one, a single-layer NLL-curve point one layer of the unpruned model. `PrefixReuse`
keeps each decoder layer's input for the last few plans it measured (the most recently used
first) and starts every new measurement at the deepest layer it can take from one of them:

    reuse = PrefixReuse(model, ids, batch_size=8)
    nll = reuse.nll(plan)        # per-sequence NLL under the router-masked plan; None: unpruned
    reuse.layers_run             # decoder layers computed so far (a full pass = all of them)

The layers before the start are swapped for identity modules for that call and the stored
states enter as `inputs_embeds`, which every supported family passes to its first decoder layer
unchanged; the states layer j receives are then the same tensors the full forward would give it,
so the NLL equals the full forward's (tests/test_prefix.py checks every family). Memory: one
(sequences x seq_len x hidden) tensor per stored layer input and plan, at most `max_bytes`; past
that, only evenly spaced layer inputs are kept, and with too little room none (a full pass each).
The layer-sequential search (grape.searching.sequential) shares prefixes by the same rule
(:func:`kept_experts`), for a whole generation of plans at once.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from grape.models.layerwise import PassThrough, decoder_layers
from grape.searching.sensitivity import masked
from solvers.plan import Plan

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB of stored layer inputs


@contextlib.contextmanager
def _skipping(layers: nn.ModuleList, count: int):
    originals = [layers[i] for i in range(count)]
    try:
        for i, layer in enumerate(originals):
            layers[i] = PassThrough(layer)
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


class PrefixReuse:
    """Per-sequence NLL of router-masked plans on fixed `ids`, reusing shared prefixes."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int,
                 max_bytes: int = DEFAULT_MAX_BYTES, slots: int = 2):
        self.model, self.ids, self.batch_size, self.slots = model, ids, batch_size, slots
        self.layers = decoder_layers(model)
        embed = model.get_input_embeddings().weight
        per_input = ids.numel() * int(model.config.hidden_size) * embed.element_size()
        room = max_bytes // max(per_input * slots, 1)
        count = len(self.layers)
        self.boundaries = _evenly(range(1, count), min(room, count - 1))  # layer 0's input: the embeddings
        self.stored: OrderedDict[tuple, tuple[dict, dict]] = OrderedDict()  # key -> (kept, states)
        self.layers_run = 0

    def nll(self, plan: Plan | None) -> np.ndarray:
        kept = kept_experts(plan)
        start, states = self._reference(kept)
        record = {b: [] for b in self.boundaries if b > start}
        hooks = [self.layers[b].register_forward_pre_hook(
            lambda module, args, kwargs, b=b: record[b].append(_hidden(args, kwargs)), with_kwargs=True)
            for b in record]
        context = masked(self.model, plan) if plan is not None else contextlib.nullcontext()
        try:
            with context, _skipping(self.layers, start):
                out = self._run(states.get(start) if start else None)
        finally:
            for hook in hooks:
                hook.remove()
        self.layers_run += len(self.layers) - start
        self._store(kept, {**{b: s for b, s in states.items() if b <= start}, **record})
        return out

    @torch.no_grad()
    def _run(self, inputs: list[torch.Tensor] | None) -> np.ndarray:
        device = self.model.get_input_embeddings().weight.device
        out = []
        for i, batch in enumerate(self.ids.split(self.batch_size)):
            batch = batch.to(device)
            if inputs is None:
                logits = self.model(input_ids=batch, use_cache=False).logits
            else:
                logits = self.model(inputs_embeds=inputs[i], use_cache=False).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:],
                                               reduction="none")
            out.append(loss.mean(dim=1).cpu().double().numpy())
        return np.concatenate(out)

    def _reference(self, kept: dict[int, tuple]) -> tuple[int, dict]:
        """(the deepest stored layer input this plan can start from, that plan's states)."""
        best, best_key = 0, None
        for key, (other, states) in reversed(self.stored.items()):  # most recently used first
            first = _first_difference(kept, other, len(self.layers))
            start = max((b for b in states if b <= first), default=0)
            if start > best:
                best, best_key = start, key
        if best_key is None:
            return 0, {}
        self.stored.move_to_end(best_key)
        return best, self.stored[best_key][1]

    def _store(self, kept: dict[int, tuple], states: dict) -> None:
        key = tuple(sorted(kept.items()))
        self.stored.pop(key, None)
        self.stored[key] = (kept, states)
        while len(self.stored) > self.slots:
            self.stored.popitem(last=False)


def kept_experts(plan: Plan | None) -> dict[int, tuple]:
    """The kept experts of each MoE layer that loses any; a layer not listed keeps all (so the
    unpruned model is {})."""
    if plan is None:
        return {}
    return {layer: tuple(plan.kept[layer]) for layer in plan.layers if plan.removed[layer]}


def _first_difference(a: dict[int, tuple], b: dict[int, tuple], count: int) -> int:
    """The first decoder layer whose kept experts differ between `a` and `b` (count: none)."""
    return min((layer for layer in set(a) | set(b) if a.get(layer) != b.get(layer)), default=count)


def _evenly(candidates: range, count: int) -> tuple[int, ...]:
    if count <= 0:
        return ()
    values = list(candidates)
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return tuple(sorted({values[i] for i in picks}))


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return (args[0] if args else kwargs["hidden_states"]).detach()


__all__ = ["DEFAULT_MAX_BYTES", "PrefixReuse", "kept_experts"]
