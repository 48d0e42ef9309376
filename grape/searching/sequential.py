"""Layer-sequential search: candidate plans measured one decoder layer at a time from the shards.

The loss-verified search (grape.searching.algorithm) measures each candidate plan by the next-token NLL
of the router-masked model on held-out tokens. Where the model does not fit in memory (the rule
calibration uses, grape.models.placement), this module measures a *generation* of plans together
without ever holding more than one decoder layer:

1. the model is a skeleton on the meta device (grape.models.layerwise.build_skeleton); the search
   tokens are embedded once (only the embedding table loaded), batch by batch as the
   whole-model forward batches them;
2. for each decoder layer l, its weights are read from the shards, and every *distinct prefix*
   runs through it: plans that keep the same experts in every layer before l share the hidden
   states entering l (the tree grape.searching.prefix walks one plan at a time, here all at once). A
   prefix whose plans keep different experts at l splits; each branch runs layer l with the
   router of l masked to its kept experts (grape.searching.sensitivity.masked, the mask the whole-model
   search installs), the last branch in place of its parent. Then the layer is freed;
3. final norm and LM head (the model's own forward, every decoder layer standing aside) give
   each distinct plan's per-sequence NLL, computed as grape.searching.prefix computes it.

Same batches, same dtype, same modules called with the arguments the model's forward gives them
(grape.calibration.sequential.layer_arguments): the NLLs equal the whole-model search's to the bit
(tests/test_search_sequential.py: six families, two of them hybrids). Memory: one decoder layer (or the embedding /
head) plus one (sequences x seq_len x hidden) tensor per distinct plan of the generation, on the
device when they fit and else in host memory or a file (grape.calibration.sequential.choose_storage).

    stream = LayerStream(SequentialModel("/models/DeepSeek-V3", device="cuda:0"))
    evaluator = stream.evaluator(search_ids, batch_size=8)
    nlls = evaluator.measure([None, plan_a, plan_b])   # None: the unpruned model
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from grape.models.layerwise import (
    LayerLoader,
    PassThrough,
    bound_heap,
    build_skeleton,
    decoder_layers,
    release_memory,
)
from grape.searching.prefix import kept_experts
from grape.searching.sensitivity import masked
from solvers.plan import Plan


@dataclass(frozen=True)
class SequentialModel:
    """A checkpoint the search reads layer by layer: where it runs and where the hidden states
    live ('auto', 'device', 'cpu' or 'disk', as calibration's --hidden-states)."""

    model_dir: Path
    device: str = "cpu"
    dtype: str = "auto"
    hidden_states: str = "auto"
    reason: str = "--mode sequential"  # why the search runs layer by layer (for the record)
    scratch: Path | None = None  # folder of the hidden-state files ('disk'); None: the temp folder

    def __post_init__(self) -> None:
        from grape.errors import DataError
        from grape.calibration.sequential import STORAGE

        if self.hidden_states not in STORAGE:
            raise DataError(f"hidden_states {self.hidden_states!r} is not one of {', '.join(STORAGE)} "
                            "(--hidden-states)")


class _Stop(Exception):
    """Raised by a hook to end a forward once it has what it needs (layer 0's input)."""

    def __init__(self, value: torch.Tensor):
        super().__init__("captured")
        self.value = value


class _Substitute(nn.Module):
    """Stands in for the last decoder layer: returns the state it was given, in the form the
    real layer returns (a tensor in every supported family; a 1-tuple where it was a tuple)."""

    def __init__(self, layer: nn.Module, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = None, as_tuple
        object.__setattr__(self, "_wrapped", layer)

    def forward(self, hidden_states, *args, **kwargs):
        return (self.value,) if self.as_tuple else self.value

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


class LayerStream:
    """The checkpoint opened for layer-by-layer measurement: the skeleton, the shard reader and
    the per-batch-shape layer arguments, shared by every evaluator made from it."""

    def __init__(self, spec: SequentialModel):
        from grape.models.adapters import get_adapter
        from grape.calibration.sequential import _config as checkpoint_config  # calibration's own reading
        from grape.calibration.sequential import (
            LayerArguments,
            place_position_modules,
            refuse_unhandled,
            resolve_dtype,
        )

        bound_heap()
        self.spec, self.device = spec, torch.device(spec.device)
        dtype = resolve_dtype(spec.dtype, self.device, checkpoint_config(spec.model_dir))
        self.model = build_skeleton(spec.model_dir, dtype)
        refuse_unhandled(self.model)
        self.dtype = next(self.model.parameters()).dtype
        self.adapter = get_adapter(self.model)
        self.loader = LayerLoader(self.model, spec.model_dir, self.device, self.dtype)
        place_position_modules(self.model, self.device)
        self.arguments = LayerArguments(self.model, self.device, self.dtype)
        self.layers = decoder_layers(self.model)
        self.largest = max(self.loader.module_bytes(layer) for layer in self.layers)
        self.tuple_output = False  # what a decoder layer returned (set by the first one run)
        self.generations = 0  # walks over the layers: each reads the checkpoint once

    def identity(self):
        """The model identity (router fingerprint included), only the routers read."""
        from grape.calibration.sequential import _identity  # as layer-sequential calibration reads it

        return _identity(self.loader, self.adapter)

    def evaluator(self, ids: torch.Tensor, batch_size: int) -> StreamEvaluator:
        return StreamEvaluator(self, ids, batch_size)

    def record(self) -> dict:
        """How the search measured, for search.json."""
        return {"mode": "sequential", "reason": self.spec.reason, "device": str(self.device),
                "dtype": str(self.dtype), "hidden_states": self.spec.hidden_states,
                "generations": self.generations}

    # -- the pieces of a generation ---------------------------------------------------------
    def module_name(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    def load(self, module: nn.Module, what: str) -> nn.Module:
        loaded = self.loader.load(self.loader.keys_under(self.module_name(module)), module, what)
        release_memory()  # the load's transient copies
        return loaded

    def load_layer(self, index: int) -> nn.Module:
        layer = self.loader.load_layer(index)
        release_memory()
        return layer

    def free(self, module: nn.Module) -> None:
        self.loader.free(module)
        release_memory()

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """What decoder layer 0 receives for `batch` in the model's own forward (embedding
        scale and all), the forward stopped there (the embedding table must be loaded)."""
        def stop(module, args, kwargs):
            raise _Stop((args[0] if args else kwargs["hidden_states"]).detach())

        hook = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(input_ids=batch.to(self.device), use_cache=False)
        except _Stop as captured:
            return captured.value
        finally:
            hook.remove()
        raise RuntimeError("the model's forward never reached its first decoder layer")

    def run_layer(self, layer: nn.Module, index: int, source, target, rows, ids) -> None:
        """Decoder layer `index` over every batch: `source`'s states in, `target`'s out."""
        for rows_b, batch in zip(rows, ids):
            args, kwargs = self.arguments.get(batch, None)[index]
            out = layer(source.get(rows_b), *args, **kwargs)
            self.tuple_output = isinstance(out, (tuple, list))
            target.put(rows_b, out[0] if self.tuple_output else out)

    @contextlib.contextmanager
    def head(self):
        """Final norm and LM head loaded, every decoder layer standing aside and the last one
        replaced by a stand-in whose `value` is the state to read out: the model's own forward
        then applies exactly what it applies after its layers (norm, head, logit scaling)."""
        from grape.calibration.sequential import final_norm_name

        inner = self.model.model
        norm = getattr(inner, final_norm_name(inner))
        embed, lm_head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        # tied embeddings: the checkpoint has no head weight; from_pretrained shares the table
        tied = not self.loader.keys_under(self.module_name(lm_head))
        head_weight = lm_head.weight
        loaded = [self.load(norm, "the final norm"),
                  self.load(embed if tied else lm_head, "the LM head")]
        if tied:
            lm_head.weight = embed.weight
        originals = list(self.layers)
        substitute = _Substitute(originals[-1], self.tuple_output)
        try:
            for i, layer in enumerate(originals[:-1]):
                self.layers[i] = PassThrough(layer)
            self.layers[len(originals) - 1] = substitute
            yield substitute
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
            lm_head.weight = head_weight
            for module in loaded:
                self.free(module)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        """The model's logits for a final decoder-layer output (inside :meth:`head`)."""
        zeros = torch.zeros_like(state)  # the layers it would feed stand aside
        return self.model(inputs_embeds=zeros, use_cache=False).logits


class StreamEvaluator:
    """Per-sequence NLL of router-masked plans on fixed `ids`, a generation at a time."""

    batched = True  # measures many plans in one walk over the layers

    def __init__(self, stream: LayerStream, ids: torch.Tensor, batch_size: int):
        self.stream, self.ids, self.batch_size = stream, ids, batch_size
        self.batches = list(ids.split(batch_size))  # the whole-model search's batches
        starts = np.cumsum([0] + [len(b) for b in self.batches])
        self.rows = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self.layer_count = len(stream.layers)
        self.layers_run = 0  # decoder layers computed, one per (layer, distinct prefix)
        self.peak_states = 0  # most hidden-state tensors held at once
        self.storage = None  # where the last generation kept them

    @torch.no_grad()
    def measure(self, plans: Sequence[Plan | None]) -> list[np.ndarray]:
        """Each plan's per-sequence NLL (None: the unpruned model); plans keeping the same
        experts everywhere are measured once."""
        kept = [kept_experts(plan) for plan in plans]
        keys = [tuple(sorted(k.items())) for k in kept]
        distinct = list(dict.fromkeys(keys))
        plan_of = {key: kept[keys.index(key)] for key in distinct}
        states = self._walk([plan_of[key] for key in distinct])
        by_key = dict(zip(distinct, self._read_out(states)))
        return [by_key[key] for key in keys]

    def _new_state(self):
        from grape.calibration.sequential import HiddenStates

        spec = self.stream.spec
        shape = (int(self.ids.shape[0]), int(self.ids.shape[1]), int(self.stream.model.config.hidden_size))
        scratch = Path(spec.scratch) if spec.scratch else Path(tempfile.gettempdir())
        return HiddenStates(shape, self.stream.dtype, self.storage, self.stream.device, scratch)

    def _walk(self, plans: list[dict]) -> list:
        """The decoder layers over every distinct prefix; the final state of each plan."""
        from grape.calibration.sequential import choose_storage

        stream = self.stream
        stream.generations += 1
        per_state = self.ids.numel() * int(stream.model.config.hidden_size) * stream.dtype.itemsize
        self.storage = choose_storage(stream.spec.hidden_states, per_state * len(plans), stream.device,
                                      stream.largest)
        root = self._new_state()
        embed = stream.load(stream.model.get_input_embeddings(), "the embeddings")
        try:
            for rows, batch in zip(self.rows, self.batches):
                root.put(rows, stream.embed(batch))
        finally:
            stream.free(embed)
        groups = [(root, list(range(len(plans))))]  # (state entering the layer, its plans)
        self.peak_states = 1
        try:
            for index in range(self.layer_count):
                groups = self._layer(index, groups, plans)
                self.peak_states = max(self.peak_states, len(groups))
        except BaseException:
            for state, _ in groups:
                state.close()
            raise
        final = [None] * len(plans)
        for state, members in groups:
            for member in members:
                final[member] = state
        return final

    def _layer(self, index: int, groups: list, plans: list[dict]) -> list:
        """Layer `index` for every group; groups split where their plans keep different experts."""
        stream = self.stream
        layer = stream.load_layer(index)
        out = []
        try:
            for state, members in groups:
                branches: dict = {}
                for member in members:
                    branches.setdefault(plans[member].get(index), []).append(member)
                for position, (keep, branch) in enumerate(branches.items()):
                    # the last branch overwrites its parent's states, batch by batch
                    target = state if position == len(branches) - 1 else self._new_state()
                    out.append((target, branch))
                    with self._masked(index, keep):
                        stream.run_layer(layer, index, state, target, self.rows, self.batches)
                    self.layers_run += 1
        except BaseException:
            parents = {id(state) for state, _ in groups}
            for state, _ in out:  # the caller closes the parents
                if id(state) not in parents:
                    state.close()
            raise
        finally:
            stream.free(layer)
        return out

    def _masked(self, index: int, keep):
        """The router of layer `index` masked to `keep` as the whole-model search masks it; no
        mask where the plan removes nothing there (grape.searching.prefix shares those states too)."""
        if keep is None:
            return contextlib.nullcontext()
        experts = self.stream.adapter.num_experts(index)
        plan = Plan(kept={index: list(keep)}, removed={index: [e for e in range(experts) if e not in keep]})
        return masked(self.stream.model, plan)

    def _read_out(self, final: list) -> list[np.ndarray]:
        """Per-sequence NLL of each final state, computed as grape.searching.prefix computes it."""
        out, done = [], {}
        try:
            with self.stream.head() as substitute:
                for state in final:
                    if id(state) not in done:
                        done[id(state)] = self._nll(state, substitute)
                    out.append(done[id(state)])
        finally:
            for state in {id(s): s for s in final}.values():
                state.close()
        return out

    def _nll(self, state, substitute: _Substitute) -> np.ndarray:
        nll = []
        for rows, batch in zip(self.rows, self.batches):
            substitute.value = state.get(rows)
            logits = self.stream.logits(substitute.value)
            batch = batch.to(logits.device)
            loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:],
                                               reduction="none")
            nll.append(loss.mean(dim=1).cpu().double().numpy())
        substitute.value = None
        return np.concatenate(nll)


def open_stream(spec: SequentialModel) -> LayerStream:
    """The checkpoint in `spec.model_dir` opened for the search: config.json checked (a one-line
    error naming the folder), the skeleton built; no weight is read until a generation runs."""
    from grape.models.files import check_model_dir

    check_model_dir(spec.model_dir)
    return LayerStream(spec)


__all__ = ["LayerStream", "SequentialModel", "StreamEvaluator", "open_stream"]
