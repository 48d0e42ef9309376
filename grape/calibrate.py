"""Calibration: model + data -> Scores (per-expert statistics, similarity, layer cost curves).

    from grape.calibrate import CalibrationConfig, calibrate
    from grape.data import load_calibration_data

    config = CalibrationConfig(seq_len=2048, samples=1024)
    data = load_calibration_data(["corpus/"], tokenizer, seq_len=config.seq_len,
                                 samples=config.samples, seed=config.seed)
    scores = calibrate(model, data, config)
    scores.save("scores.npz")

One forward pass over the data under an :class:`grape.observer.ExpertObserver` gives the
per-expert statistics (from the model's real routing and each routed token's real expert output)
and each MoE block's output energy. The observer also keeps `subsample` rows of every MoE layer's
input; on those rows every expert of the layer is evaluated once, which gives

* similarity matrices (``cka``: linear CKA of the experts' outputs; ``cosine``: cosine of their
  mean outputs) and, without data, ``router`` (cosine of the router weight rows);
* the layer cost curve: cost_curve[n] is the mean squared error of the routed output when only
  the n most important experts (by `criterion`) are kept, routed as the model routes with the
  others masked (see :func:`cost_curve`).

See docs/calibration.md for the formulas and the normalisation choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import grape
from grape.adapters.base import MoEAdapter, get_adapter
from grape.data import CalibrationData
from grape.errors import DataError
from grape.modelfiles import check_seq_len
from grape.observer import ExpertObserver, per_call_quota
from solvers.errors import ScoresError
from solvers.scores import CRITERIA, NORMALIZATIONS, LayerScores, Scores

# rows of one all-experts evaluation call; bounds the transient memory of the subsample pass
_MAX_ROWS_PER_CALL = 1 << 16


# -- similarity -----------------------------------------------------------------------------
def _finish_similarity(sim: torch.Tensor, low: float) -> np.ndarray:
    """Symmetric, finite, clipped to [low, 1], with an exact unit diagonal."""
    sim = torch.nan_to_num(sim.to(torch.float64), nan=0.0, posinf=1.0, neginf=low)
    sim = ((sim + sim.T) / 2).clamp(low, 1.0)
    sim.fill_diagonal_(1.0)
    return sim.cpu().numpy()


def _cosine_rows(rows: torch.Tensor) -> np.ndarray:
    rows = rows.to(torch.float64)
    norms = rows.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp_min(1e-300), torch.zeros_like(rows))
    return _finish_similarity(unit @ unit.T, low=-1.0)


def linear_cka(outputs: torch.Tensor) -> np.ndarray:
    """Linear CKA between every pair of experts from their outputs on the same tokens.

    outputs: (E, T, H). With X_e the token-centred (T, H) output of expert e and K_e = X_e X_e^T,
    CKA(i, j) = <K_i, K_j>_F / (||K_i||_F ||K_j||_F), in [0, 1]; an expert with constant output
    has similarity 0 to every other expert."""
    num_experts, tokens, hidden = outputs.shape
    chunk = max(1, (1 << 26) // max(tokens * hidden, 1))  # ~256 MB of fp32 per chunk
    grams = []
    for start in range(0, num_experts, chunk):
        x = outputs[start : start + chunk].to(torch.float32)
        x = x - x.mean(dim=1, keepdim=True)
        grams.append((x @ x.transpose(1, 2)).to(torch.float64).reshape(x.shape[0], -1))
    flat = torch.cat(grams)  # (E, T*T)
    inner = flat @ flat.T
    norm = inner.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    cka = torch.where(denom > 0, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))
    return _finish_similarity(cka, low=0.0)


def mean_output_cosine(outputs: torch.Tensor) -> np.ndarray:
    """Cosine similarity of the experts' mean outputs on the shared tokens (HC-SMoE), in [-1, 1]."""
    return _cosine_rows(outputs.to(torch.float32).mean(dim=1))


def router_cosine(adapter: MoEAdapter, layer: int) -> np.ndarray:
    """Data-free: cosine similarity of the router weight rows [E, H], in [-1, 1]."""
    with onloaded([adapter.router(layer)]):
        return _cosine_rows(adapter.router(layer).weight.detach())


# kinds measured from the experts' outputs on the shared subsample
OUTPUT_SIMILARITIES: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
    "cka": linear_cka,
    "cosine": mean_output_cosine,
}
# kinds that need no data
WEIGHT_SIMILARITIES: dict[str, Callable[[MoEAdapter, int], np.ndarray]] = {
    "router": router_cosine,
}
SIMILARITIES = tuple(OUTPUT_SIMILARITIES) + tuple(WEIGHT_SIMILARITIES)


# -- subsample measurements ---------------------------------------------------------------
@torch.no_grad()
def all_expert_outputs(adapter: MoEAdapter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's output f_e(x) on every row of `hidden`: (E, T, H) in the model's dtype.

    Calls the experts module itself (so accelerate offload hooks fire) with each row routed to
    one expert at unit weight, a few experts per call."""
    experts = adapter.experts(layer)
    num_experts, tokens = adapter.num_experts(layer), hidden.shape[0]
    per_call = max(1, _MAX_ROWS_PER_CALL // max(tokens, 1))
    out = []
    for start in range(0, num_experts, per_call):
        ids = torch.arange(start, min(num_experts, start + per_call), device=hidden.device)
        rows = hidden.repeat(len(ids), 1)
        index = ids.repeat_interleave(tokens).unsqueeze(1)
        ones = torch.ones(rows.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        out.append(experts(rows, index, ones).reshape(len(ids), tokens, -1))
    return torch.cat(out)


def dense_weights(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Routing as a dense (T, E) float64 matrix: entry (t, e) is the weight token t gives e."""
    out = torch.zeros(
        top_k_index.shape[0], num_experts, dtype=torch.float64, device=top_k_index.device
    )
    return out.scatter_add_(1, top_k_index, top_k_weights.to(torch.float64))


def token_grams(outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices of the experts' outputs, (T, E, E) float64:
    G_t[i, j] = <f_i(x_t), f_j(x_t)>."""
    num_experts, _, hidden = outputs.shape
    per_token = outputs.transpose(0, 1)  # (T, E, H)
    chunk = max(1, (1 << 25) // max(num_experts * hidden, 1))  # ~256 MB of float64 per chunk
    grams = []
    for x in per_token.split(chunk):
        x = x.to(torch.float64)
        grams.append(x @ x.transpose(1, 2))
    return torch.cat(grams)


@torch.no_grad()
def cost_curve(
    adapter: MoEAdapter, layer: int, hidden: torch.Tensor, outputs: torch.Tensor, order: np.ndarray
) -> np.ndarray:
    """Block output error against the number of experts kept, (E+1,) float64.

    `order` lists the experts from least to most important. Keeping n means removing
    order[:E-n]; the tokens are routed with `adapter.route_masked` (the removed experts masked,
    weights renormalised as the model does; below top_k the router uses what is left, as
    `remove` with top_k = min(top_k, kept) does), and

        cost_curve[n] = mean_x || y_E(x) - y_n(x) ||^2,

    y_n the routed-experts output (shared experts cancel in the difference). So cost_curve[E]
    is 0 and cost_curve[0] is the mean energy of the routed output. With W_n the (T, E) routing
    weights and G_t the per-token Gram matrix of the expert outputs, the error of token t is
    d_t^T G_t d_t with d_t = W_E[t] - W_n[t]: one Gram per layer, then O(T E^2) per n."""
    num_experts = adapter.num_experts(layer)
    grams = token_grams(outputs)
    full = dense_weights(*adapter.route(layer, hidden), num_experts).to(grams.device)

    def error(diff: torch.Tensor) -> float:
        return float(torch.einsum("te,tef,tf->t", diff, grams, diff).clamp_min(0).mean())

    curve = np.zeros(num_experts + 1, dtype=np.float64)
    curve[0] = error(full)
    for kept in range(1, num_experts):
        removed = [int(e) for e in order[: num_experts - kept]]
        pruned = dense_weights(*adapter.route_masked(layer, hidden, removed), num_experts)
        curve[kept] = error(full - pruned.to(grams.device))
    return np.nan_to_num(curve, nan=curve[0], posinf=curve[0])


# -- configuration --------------------------------------------------------------------------
@dataclass
class CalibrationConfig:
    """Every calibration setting; recorded in the scores file."""

    seq_len: int = 2048  # tokens per packed sequence
    samples: int = 1024  # packed sequences
    seed: int = 0  # document shuffle and subsample positions
    text_field: str = "text"  # JSONL / dataset field holding the text
    batch_size: int = 4  # sequences per forward
    similarity: tuple[str, ...] = ("cka", "cosine", "router")  # kinds to measure (SIMILARITIES)
    subsample: int = 256  # tokens per MoE layer on which every expert is evaluated
    cost_curves: bool = True  # measure LayerScores.cost_curve on the subsample
    criterion: str = "reap_mass"  # orders experts for the cost curves; recorded for the solver
    normalize: str = "none"  # cross-layer normalisation recommended to the solver (NORMALIZATIONS)
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        for name in ("seq_len", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.subsample < 0:
            raise DataError(f"subsample must be >= 0 tokens per layer, got {self.subsample}")
        unknown = [k for k in self.similarity if k not in SIMILARITIES]
        if unknown:
            raise ScoresError(f"unknown similarity {unknown}; choose from {list(SIMILARITIES)}")
        if self.criterion not in CRITERIA:
            raise ScoresError(
                f"unknown criterion {self.criterion!r}; choose one of {sorted(CRITERIA)}"
            )
        if self.normalize not in NORMALIZATIONS:
            raise ScoresError(
                f"unknown normalisation {self.normalize!r}; choose one of {sorted(NORMALIZATIONS)}"
            )
        if self.subsample == 0 and self.needs_subsample:
            raise DataError(
                "similarity from outputs (cka, cosine) and cost curves need a token "
                "subsample; set subsample > 0 (e.g. 256) or ask only for 'router'"
            )

    @property
    def needs_subsample(self) -> bool:
        return self.cost_curves or any(k in OUTPUT_SIMILARITIES for k in self.similarity)


# -- the verb -------------------------------------------------------------------------------
@contextlib.contextmanager
def onloaded(modules: list[nn.Module]):
    """Give accelerate-offloaded modules (weights on `meta`, loaded per forward) their real
    weights for reads outside a forward, such as the router fingerprint. No-op otherwise."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(align_module_device(module))
        yield


def _input_device(model: nn.Module) -> torch.device:
    weight = model.get_input_embeddings().weight
    return torch.device("cpu") if weight.device.type == "meta" else weight.device


def is_tokenized(data) -> bool:
    """True for data `calibrate` takes as it is (no packing): CalibrationData, an input-ids
    tensor, or a tokenizer's output (a mapping / BatchEncoding holding `input_ids`)."""
    return isinstance(data, (CalibrationData, torch.Tensor)) or (
        isinstance(data, Mapping) and "input_ids" in data
    )


def _int_matrix(value, name: str) -> torch.Tensor:
    try:  # a tokenizer without return_tensors gives lists of lists
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"calibration {name} must be a 2-D integer tensor (tokenize with padding=True, "
            f"return_tensors='pt'): {exc}"
        ) from None
    if tensor.dim() != 2 or tensor.is_floating_point() or tensor.is_complex():
        raise DataError(
            f"calibration {name} must be a 2-D integer tensor (batch, seq), got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    return tensor


def _as_input_ids(
    data: CalibrationData | torch.Tensor | Mapping,
) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(input_ids, attention_mask or None when every position is real, provenance)."""
    if isinstance(data, CalibrationData):
        return data.input_ids, None, dict(data.provenance)
    if isinstance(data, torch.Tensor) and data.dim() == 2 and not data.is_floating_point():
        return data, None, {"sources": ["input_ids tensor"]}
    if isinstance(data, Mapping) and "input_ids" in data:
        input_ids = _int_matrix(data["input_ids"], "input_ids")
        mask = data.get("attention_mask")
        if mask is None:
            return input_ids, None, {"sources": ["input_ids tensor"]}
        mask = _int_matrix(mask, "attention_mask")
        return input_ids, _check_mask(mask, input_ids), {"sources": ["tokenized batch"]}
    raise DataError(
        f"calibration data must be a CalibrationData (grape.data.load_calibration_data), "
        f"a 2-D integer tensor of input ids, or a tokenizer's output with input_ids (and "
        f"attention_mask), got {type(data).__name__}"
    )


def _check_mask(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask as bool, or None when it masks nothing (the unmasked forward is then
    the exact same computation as for an input-ids tensor)."""
    if mask.shape != input_ids.shape:
        raise DataError(
            f"calibration attention_mask has shape {tuple(mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with the ids"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise DataError("calibration attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise DataError("calibration attention_mask marks no real token; pass non-empty texts")
    return None if bool(mask.all()) else mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position within its own sequence (cumsum - 1; 0 on padding). A forward
    does not always derive these from the mask (generate does), and with left padding the
    default 0..seq-1 would shift every real token's rotary position."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=False)


def calibrate(
    model: nn.Module,
    data: CalibrationData | torch.Tensor | Mapping,
    config: CalibrationConfig | None = None,
    *,
    adapter: MoEAdapter | None = None,
) -> Scores:
    """Measure `model` on `data` and return its Scores (carrying the model's identity).

    `data`: packed CalibrationData, a (batch, seq) input-ids tensor, or a tokenizer's output
    (``tokenizer(texts, padding=True, return_tensors="pt")``: a mapping with `input_ids` and
    `attention_mask`). With a mask, the forward gets it plus position ids derived from it (so
    left and right padding give the same results), and padded positions enter no statistic,
    subsample or token count."""
    config = config or CalibrationConfig()
    config.validate()
    adapter = adapter or get_adapter(model)
    input_ids, attention_mask, provenance = _as_input_ids(data)
    # positions past the model's context are meaningless: refuse them before any forward
    check_seq_len(int(input_ids.shape[1]), model.config.to_dict(), "calibration sequence length")
    # statistics count real tokens only: padded positions never reach any accumulator
    tokens = int(input_ids.numel() if attention_mask is None else attention_mask.sum())
    with onloaded([adapter.router(layer) for layer in adapter.moe_blocks()]):
        identity = adapter.identity()
    batches = list(input_ids.split(config.batch_size))
    masks = (
        [None] * len(batches)
        if attention_mask is None
        else list(attention_mask.split(config.batch_size))
    )
    sample_tokens = config.subsample if config.needs_subsample else 0
    was_training = model.training
    model.eval()
    observer = ExpertObserver(
        model,
        adapter,
        sample_tokens=sample_tokens,
        sample_per_call=per_call_quota(sample_tokens, len(batches)),
        seed=config.seed,
    )
    try:
        with torch.no_grad(), observer:
            device = _input_device(model)
            for batch, mask in _progress(
                zip(batches, masks), len(batches), "calibrating", config.progress
            ):
                observer.set_token_mask(mask)
                model(
                    input_ids=batch.to(device),
                    use_cache=False,
                    logits_to_keep=1,
                    **_mask_kwargs(mask, device),
                )
            observer.pause()
            observer.set_token_mask(None)
            observations = observer.results()
            layers = {
                layer: _layer_scores(adapter, layer, obs, config, tokens)
                for layer, obs in _progress(
                    observations.items(),
                    len(observations),
                    "similarity and cost curves",
                    config.progress,
                )
            }
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    calibration = {
        **provenance,
        **{k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        "similarity": list(config.similarity),
        "subsample_tokens": {
            str(layer): int(o.samples.shape[0]) if o.samples is not None else 0
            for layer, o in observations.items()
        },
        "cost_curve": "mean squared error of the routed output keeping the n best experts"
        if config.cost_curves
        else None,
        "dtype": str(dtype).replace("torch.", ""),
        # what was really run (pre-packed data may differ from the config's packing settings)
        "samples": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
    }
    return Scores(
        model=identity,
        layers=layers,
        tokens=tokens,
        calibration=calibration,
        created_by=f"grape {grape.__version__} calibrate",
    )


def _mask_kwargs(mask: torch.Tensor | None, device: torch.device) -> dict:
    """Forward arguments for a padded batch: the mask, and position ids derived from it."""
    if mask is None:
        return {}
    return {
        "attention_mask": mask.to(device=device, dtype=torch.long),
        "position_ids": position_ids_from_mask(mask).to(device),
    }


def _layer_scores(
    adapter: MoEAdapter, layer: int, obs, config: CalibrationConfig, tokens: int
) -> LayerScores:
    similarity = {
        kind: WEIGHT_SIMILARITIES[kind](adapter, layer)
        for kind in config.similarity
        if kind in WEIGHT_SIMILARITIES
    }
    curve = None
    if config.needs_subsample and obs.samples is not None:
        outputs = all_expert_outputs(adapter, layer, obs.samples)
        for kind in config.similarity:
            if kind in OUTPUT_SIMILARITIES:
                similarity[kind] = OUTPUT_SIMILARITIES[kind](outputs)
        if config.cost_curves:
            importance = CRITERIA[config.criterion](obs.stats, tokens)
            order = np.argsort(importance, kind="stable")
            curve = cost_curve(adapter, layer, obs.samples, outputs, order)
        del outputs
    return LayerScores(
        layer=layer,
        stats=obs.stats,
        expert_bytes=np.asarray(adapter.expert_bytes(layer), dtype=np.int64),
        output_energy=obs.output_energy,
        similarity=similarity,
        cost_curve=curve,
    )
