"""Model sizes as deployed: what the scores file records beyond the routed experts, and the
deployment view of it (``--deploy-dtype``) that byte budgets and per-device memory caps count.

Calibration records, from the checkpoint's own files (the safetensors headers), the bytes and
parameter counts of every routed expert *as stored* (bf16, fp8 with its block scales, MXFP4
with its exponents), and of everything else: per decoder layer its other parts (attention,
norms, router, shared experts; a dense layer whole), the embeddings and the head (lm head and
final norm), plus the attention shape the KV cache needs. So the sizes do not depend on the
dtype the model was calibrated in. ``grape synth`` records the same for its shapes, in bf16.

A deployment in another format rescales by parameter count (:func:`deployed`): ``bf16``,
``fp16`` and ``fp32`` re-size every parameter; ``fp8`` and ``mxfp4`` re-size the routed
experts only (the part those formats quantise in every release that ships them; the rest stays
as stored, which errs on the safe side where a release also quantises attention).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from solvers.errors import ScoresError, UserError

# bytes per parameter of each deployment format; fp8 carries one float32 scale per 128 x 128
# block (DeepSeek-V3's layout), mxfp4 one E8M0 exponent byte per 32 values (gpt-oss's)
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0 + 4.0 / (128 * 128),
    "mxfp4": 0.5 + 1.0 / 32,
}
QUANTISED = ("fp8", "mxfp4")
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
            "half": "fp16", "float8": "fp8", "float8_e4m3fn": "fp8", "e4m3": "fp8"}


def parse_deploy_dtype(text: str | None) -> str | None:
    """'bf16', 'bfloat16', 'FP8', ... -> a key of BYTES_PER_PARAM (None stays None)."""
    if text is None:
        return None
    word = str(text).strip().lower()
    word = _ALIASES.get(word, word)
    if word not in BYTES_PER_PARAM:
        raise UserError(f"--deploy-dtype {text!r}: choose one of {', '.join(BYTES_PER_PARAM)}")
    return word


def width(dtype: str | None) -> float | None:
    """Bytes per element of a stored float dtype name ('bfloat16', 'float32', ...), else None."""
    key = _ALIASES.get(str(dtype).replace("torch.", "").lower(), str(dtype).lower())
    return BYTES_PER_PARAM.get(key) if key not in QUANTISED else None


@dataclass(frozen=True)
class Part:
    """Bytes as stored and parameter count of some weights."""

    bytes: int
    params: int

    def to_json(self) -> list[int]:
        return [int(self.bytes), int(self.params)]

    @classmethod
    def from_json(cls, value) -> Part:
        return cls(int(value[0]), int(value[1]))


@dataclass(frozen=True)
class KVShape:
    """What one token adds to the KV cache, per decoder layer."""

    elems_per_token: tuple[int, ...]  # K and V elements of all KV heads (MLA: the latent)
    window: tuple[int | None, ...]  # sliding-window length, None for full attention
    heads: int  # KV heads a tensor-parallel split shares out (1: MLA's latent is replicated)

    def to_json(self) -> dict:
        return {"elems_per_token": list(self.elems_per_token), "window": list(self.window),
                "heads": self.heads}

    @classmethod
    def from_json(cls, data: dict) -> KVShape:
        return cls(tuple(int(v) for v in data["elems_per_token"]),
                   tuple(None if v is None else int(v) for v in data["window"]), int(data["heads"]))

    def layer_tokens(self, layer: int, max_seq_len: int) -> int:
        window = self.window[layer]
        return max_seq_len if window is None else min(max_seq_len, window)


@dataclass
class ModelSizes:
    """The recorded sizes (scores format version 2): see the module docstring."""

    dtype: str  # the stored float dtype of the unquantised weights ("bfloat16")
    quantization: str | None  # "fp8", "mxfp4", ... when the checkpoint is quantised
    source: str  # "checkpoint" (safetensors headers), "parameters" (in memory) or "synthetic"
    layers: dict[int, Part]  # every decoder layer: its parts other than the routed experts
    embed: Part
    head: Part  # lm head (none when tied) and final norm
    tied: bool = False  # lm head shares the embedding matrix
    kv: KVShape | None = None
    expert_params: dict[int, np.ndarray] = field(default_factory=dict)  # MoE layer -> (N,)

    def validate(self, num_hidden_layers: int, experts: dict[int, int]) -> None:
        if sorted(self.layers) != list(range(num_hidden_layers)):
            raise ScoresError(f"sizes: `layers` must list decoder layers 0..{num_hidden_layers - 1}")
        if sorted(self.expert_params) != sorted(experts):
            raise ScoresError("sizes: expert_params must cover exactly the MoE layers")
        for layer, n in experts.items():
            params = np.asarray(self.expert_params[layer])
            if params.shape != (n,) or np.any(params < 0):
                raise ScoresError(f"layer {layer}: expert_params must be ({n},) counts >= 0")
        parts = [*self.layers.values(), self.embed, self.head]
        if any(p.bytes < 0 or p.params < 0 for p in parts):
            raise ScoresError("sizes: byte and parameter counts must be >= 0")
        if self.kv is not None and not (len(self.kv.elems_per_token) == len(self.kv.window)
                                        == num_hidden_layers and self.kv.heads >= 1):
            raise ScoresError(f"sizes: kv must give one entry per decoder layer ({num_hidden_layers})")

    def to_json(self) -> dict:
        """The `sizes` entry of the scores metadata (expert_params are arrays beside it)."""
        return {"dtype": self.dtype, "quantization": self.quantization, "source": self.source,
                "layers": {str(k): p.to_json() for k, p in sorted(self.layers.items())},
                "embed": self.embed.to_json(), "head": self.head.to_json(), "tied": self.tied,
                "kv": None if self.kv is None else self.kv.to_json()}

    @classmethod
    def from_json(cls, data: dict, expert_params: dict[int, np.ndarray]) -> ModelSizes:
        return cls(dtype=str(data["dtype"]), quantization=data.get("quantization"),
                   source=str(data.get("source", "")),
                   layers={int(k): Part.from_json(v) for k, v in data["layers"].items()},
                   embed=Part.from_json(data["embed"]), head=Part.from_json(data["head"]),
                   tied=bool(data.get("tied", False)),
                   kv=KVShape.from_json(data["kv"]) if data.get("kv") else None,
                   expert_params={int(k): np.asarray(v, dtype=np.int64) for k, v in expert_params.items()})

    def other_bytes(self) -> int:
        """Everything but the routed experts, as stored."""
        return sum(p.bytes for p in self.layers.values()) + self.embed.bytes + self.head.bytes

    def describe(self) -> str:
        stored = self.dtype + (f", {self.quantization}" if self.quantization else "")
        return {"checkpoint": f"as stored in the checkpoint ({stored})",
                "parameters": f"from the model's parameters in memory ({stored})",
                "synthetic": f"of the real model's shape ({stored}, synthetic scores)",
                }.get(self.source, f"{self.source} ({stored})")


# -- the deployment view ----------------------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """Everything a device holds besides routed experts, as deployed."""

    layers: dict[int, int]  # decoder layer -> bytes of its other parts
    embed: int
    head: int
    tied: bool
    kv: KVShape | None
    kv_width: float  # bytes per KV-cache element (the compute dtype's)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    def kv_bytes(self, layer: int, max_seq_len: int, batch: int) -> float:
        """K and V of `batch` sequences of `max_seq_len` tokens in one decoder layer."""
        if self.kv is None:
            return 0.0
        return (self.kv.elems_per_token[layer] * self.kv.layer_tokens(layer, max_seq_len)
                * batch * self.kv_width)


def device_parts(footprint: Footprint, devices: list[str], stages: dict[str, list[int]] | None,
                 kv: dict | None) -> dict[str, tuple[float, float]]:
    """Per device: (bytes of its parts other than routed experts, bytes of its KV cache).

    Pipeline (`stages`: device -> its MoE layers): a decoder layer goes with the next MoE layer
    (a trailing dense layer with the last), the embeddings with decoder layer 0, the head with
    the last decoder layer - plus a copy of the embedding matrix when it is tied and lives on
    another device. Expert parallel (`stages` None): attention, embeddings and head are split
    evenly over the ranks (tensor parallel, as vLLM's ``--enable-expert-parallel`` runs them),
    and the KV cache over at most as many ranks as there are KV heads."""
    n = footprint.num_hidden_layers
    cache = [footprint.kv_bytes(layer, kv["max_seq_len"], kv["batch"]) if kv else 0.0
             for layer in range(n)]
    if stages is None:
        other = sum(footprint.layers.values()) + footprint.embed + footprint.head
        heads = footprint.kv.heads if footprint.kv is not None else len(devices)
        share = sum(cache) / min(len(devices), heads)
        return {d: (other / len(devices), share) for d in devices}
    owner = {layer: d for d, layers in stages.items() for layer in layers}
    moe = sorted(owner)
    out = {d: [0.0, 0.0] for d in devices}

    def device_of(layer: int) -> str:
        return owner[moe[min(bisect.bisect_left(moe, layer), len(moe) - 1)]]

    for layer in range(n):
        out[device_of(layer)][0] += footprint.layers[layer]
        out[device_of(layer)][1] += cache[layer]
    first, last = device_of(0), device_of(n - 1)
    out[first][0] += footprint.embed
    out[last][0] += footprint.head + (footprint.embed if footprint.tied and last != first else 0)
    return {d: (v[0], v[1]) for d, v in out.items()}


@dataclass(frozen=True)
class Deployed:
    expert_bytes: dict[int, np.ndarray]  # MoE layer -> (N,) bytes of each routed expert
    footprint: Footprint | None  # None: the scores record the routed experts only
    note: str  # where the sizes come from, for the plan's provenance and the printed table
    dtype: str | None = None  # the --deploy-dtype they were rescaled to, if any


def deployed(scores, dtype: str | None = None) -> Deployed:
    """The sizes a plan counts: as recorded, or rescaled to `dtype` (a BYTES_PER_PARAM key)."""
    dtype = parse_deploy_dtype(dtype)
    sizes = getattr(scores, "sizes", None)
    if sizes is None:
        return _unsized(scores, dtype)
    rescale = dtype is not None
    per = BYTES_PER_PARAM[dtype] if rescale else 0.0
    experts = {
        idx: (np.round(sizes.expert_params[idx] * per).astype(np.int64) if rescale
              else np.asarray(ls.expert_bytes, dtype=np.int64))
        for idx, ls in scores.layers.items()
    }
    whole = rescale and dtype not in QUANTISED  # quantised formats re-size the experts only

    def size(part: Part) -> int:
        return round(part.params * per) if whole else int(part.bytes)

    kv_width = BYTES_PER_PARAM[dtype] if whole else (4.0 if width(sizes.dtype) == 4.0 else 2.0)
    footprint = Footprint({k: size(p) for k, p in sizes.layers.items()}, size(sizes.embed),
                          size(sizes.head), sizes.tied, sizes.kv, kv_width)
    note = sizes.describe() + (f", deployed as {dtype}" if rescale else "")
    return Deployed(experts, footprint, note, dtype)


def _unsized(scores, dtype: str | None) -> Deployed:
    """A version-1 scores file: routed experts only, at the dtype calibration ran in."""
    experts = {idx: np.asarray(ls.expert_bytes, dtype=np.int64) for idx, ls in scores.layers.items()}
    calibration = getattr(scores, "calibration", {}) or {}
    measured = "bfloat16" if calibration.get("synthetic") else calibration.get("dtype")
    note = (f"routed experts only, at the calibration dtype ({measured or 'unknown'}); "
            "re-calibrate to record the checkpoint's sizes")
    if dtype is None:
        return Deployed(experts, None, note, None)
    each = width(measured)
    if each is None:
        raise UserError("--deploy-dtype needs a scores file that records the checkpoint's sizes "
                        "(format version 2) or its calibration dtype; re-run `grape calibrate`")
    per = BYTES_PER_PARAM[dtype] / each
    return Deployed({k: np.round(v * per).astype(np.int64) for k, v in experts.items()}, None,
                    note + f", deployed as {dtype}", dtype)


__all__ = [
    "BYTES_PER_PARAM",
    "QUANTISED",
    "Deployed",
    "Footprint",
    "KVShape",
    "ModelSizes",
    "Part",
    "deployed",
    "device_parts",
    "parse_deploy_dtype",
    "width",
]
