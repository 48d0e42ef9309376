"""The scores file: what calibration measured, in a form any solver can read without torch.

Format (version 1): a numpy ``.npz`` archive (``allow_pickle=False``) holding

* ``__meta__``: a JSON string with ``format="grape.scores"``, ``version``, ``model``
  (:class:`ModelIdentity` fields), ``tokens`` (calibration tokens seen), ``calibration``
  (free-form settings: data, seq_len, samples, seed, dtype) and ``created_by``;
* per MoE layer ``l`` (the *decoder-layer* index), arrays named ``layer{l}/<name>``:

  ========================  =========  ====================================================
  name                      shape      meaning (sums run over calibration tokens routed to e)
  ========================  =========  ====================================================
  ``count``                 (N,)       tokens routed to expert e
  ``gate_sum``              (N,)       sum of the gate weight the model applied, g_e(x)
  ``norm_sum``              (N,)       sum of ||f_e(x)||_2 (expert output before gating)
  ``gate_norm_sum``         (N,)       sum of g_e(x) * ||f_e(x)||_2
  ``gate_norm_sq_sum``      (N,)       sum of (g_e(x) * ||f_e(x)||_2)^2
  ``norm_max``              (N,)       max of ||f_e(x)||_2
  ``expert_bytes``          (N,)       bytes of expert e's parameters (int64)
  ``output_energy``         ()         mean over tokens of ||y(x)||^2, y the MoE block output
  ``similarity/<kind>``     (N, N)     optional; symmetric, e.g. ``cka``, ``cosine``, ``router``
  ``cost_curve``            (N+1,)     optional; entry n = block output error keeping n experts
  ``nll_curve``             (N+1,)     optional; entry n = measured NLL increase (nats) when only
                                       this layer keeps n experts (grape.searching.sensitivity)
  ``reconstruction``        (N,)       optional; the criterion of that name: block output error
                                       once e and the experts greedy re-routed elimination removed
                                       before it are gone (grape.calibration.reconstruction.reconstruction_order)
  ========================  =========  ====================================================

All statistics are float64. ``grape synth`` writes the same format from synthetic numbers.

Version 2 (this writer) adds the sizes as deployed (:mod:`solvers.sizes`): ``expert_bytes`` are
the bytes of each expert *as the checkpoint stores them* (version 1: at the calibration dtype),
``layer{l}/expert_params`` (N,) int64 their parameter counts, and ``__meta__["sizes"]`` the
non-expert parts (per decoder layer, embeddings, head) and the KV-cache shape. Both are
optional: a file without them (any version-1 file) loads with ``sizes = None``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from solvers._io import atomic_open
from solvers.errors import ScoresError
from solvers.inputfiles import require_regular
from solvers.sizes import ModelSizes

FORMAT = "grape.scores"
VERSION = 2  # 2: expert_bytes as stored in the checkpoint, plus the optional sizes
STAT_NAMES = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "gate_norm_sq_sum", "norm_max")
# per-expert statistics a scores file may have (stored beside the others, same checks); each is
# also a criterion of the same name, available only where every layer has it
OPTIONAL_STATS = ("reconstruction",)


@dataclass(frozen=True)
class ModelIdentity:
    """Enough about a model to refuse scores that were measured on a different one."""

    model_type: str
    num_hidden_layers: int
    experts_per_layer: dict[int, int]  # decoder-layer index -> routed experts
    top_k: dict[int, int]  # decoder-layer index -> experts per token
    fingerprint: str = ""  # hash of the router weights; "" for synthetic scores
    name_or_path: str = ""
    n_group: int | None = None  # DeepSeek-V3 routing groups
    topk_group: int | None = None

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.experts_per_layer)

    def validate(self) -> None:
        """Counts that make sense: at least one MoE layer, N >= 1 experts, 1 <= top_k <= N."""
        if not self.experts_per_layer:
            raise ScoresError("the model identity lists no MoE layer")
        for layer, n in self.experts_per_layer.items():
            k = self.top_k.get(layer, 1)
            if n < 1 or not 1 <= k <= n:
                raise ScoresError(f"layer {layer}: {n} experts with top_k {k} is not a MoE layer "
                                  "(need N >= 1 and 1 <= top_k <= N)")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["experts_per_layer"] = {str(k): v for k, v in self.experts_per_layer.items()}
        out["top_k"] = {str(k): v for k, v in self.top_k.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ModelIdentity":
        data = dict(data)
        data["experts_per_layer"] = {int(k): int(v) for k, v in data["experts_per_layer"].items()}
        data["top_k"] = {int(k): int(v) for k, v in data["top_k"].items()}
        return cls(**data)

    def check_matches(self, other: "ModelIdentity", what: str = "scores") -> None:
        """Raise a ScoresError naming the first difference between two identities."""
        for name in ("model_type", "experts_per_layer", "fingerprint"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "fingerprint" and (not mine or not theirs):
                continue
            if mine != theirs:
                raise ScoresError(
                    f"{what} were measured on a different model: {name} is {mine!r} in the "
                    f"{what} but {theirs!r} in the model. Re-run `grape calibrate` on this model."
                )


@dataclass
class LayerScores:
    """Everything measured for one MoE layer."""

    layer: int
    stats: dict[str, np.ndarray]  # STAT_NAMES -> (N,)
    expert_bytes: np.ndarray  # (N,) int64
    output_energy: float = 1.0
    similarity: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (N, N)
    cost_curve: np.ndarray | None = None  # (N+1,)
    # (N+1,) optional: measured end-to-end NLL increase (nats) when only this layer keeps n
    # experts (grape.searching.sensitivity); preferred by the curves objective when every layer has one
    nll_curve: np.ndarray | None = None

    @property
    def num_experts(self) -> int:
        return int(self.expert_bytes.shape[0])


def _reason(exc: BaseException) -> str:
    """An exception as one short line, for messages about a file that cannot be read."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _numeric(value, what: str) -> np.ndarray:
    """`value` as a real-number array; a string, object or complex array is a ScoresError."""
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ScoresError(f"{what} has dtype {arr.dtype}; expected real numbers")
    return arr


# Per-expert criteria. Each takes (stats, tokens) and returns a float64 (N,) array >= 0.
def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


CRITERIA = {
    # share of tokens routed to the expert
    "frequency": lambda s, t: s["count"] / max(t, 1),
    # gate weight per token (REAP's "gate-weighted frequency")
    "gate_mass": lambda s, t: s["gate_sum"] / max(t, 1),
    # expert activation norm per token (EAN)
    "ean": lambda s, t: s["norm_sum"] / max(t, 1),
    # REAP saliency: mean of g*||f|| over the tokens routed to the expert
    "reap": lambda s, t: _safe_div(s["gate_norm_sum"], s["count"]),
    # g*||f|| per calibration token: the expected output norm the expert contributes, which
    # bounds the per-token error of dropping it. Unlike `reap` it is comparable across layers.
    "reap_mass": lambda s, t: s["gate_norm_sum"] / max(t, 1),
    # mean activation norm (MAN) and mean squared gated activation norm (MSAN)
    "man": lambda s, t: _safe_div(s["norm_sum"], s["count"]),
    "msan": lambda s, t: _safe_div(s["gate_norm_sq_sum"], s["count"]),
    "max_norm": lambda s, t: np.asarray(s["norm_max"], dtype=np.float64),
    # greedy elimination on the layer's output error with tokens re-routed around each removal:
    # sees substitution between experts, which no per-expert statistic does (grape.calibration.scoring)
    "reconstruction": lambda s, t: np.asarray(s["reconstruction"], dtype=np.float64),
}

# How a layer's scores are rescaled before they meet other layers' in one global problem.
NORMALIZATIONS = {
    # raw values: right when the criterion is already per-token and in output units
    "none": lambda v, layer: v,
    # divide by the RMS of the layer's MoE output, so each layer's scores are relative to
    # how much that layer writes into the residual stream
    "layer_energy": lambda v, layer: v / np.sqrt(max(layer.output_energy, 1e-30)),
    # each layer's scores sum to 1: every layer is worth the same in total
    "layer_sum": lambda v, layer: v / max(float(v.sum()), 1e-30),
    # each layer's largest score is 1
    "layer_max": lambda v, layer: v / max(float(v.max()), 1e-30),
}


@dataclass
class Scores:
    """Calibration output: per-layer statistics plus the identity of the measured model."""

    model: ModelIdentity
    layers: dict[int, LayerScores]
    tokens: int
    calibration: dict = field(default_factory=dict)
    created_by: str = "grape"
    sizes: ModelSizes | None = None  # the checkpoint's sizes (version 2); None in older files

    def __post_init__(self) -> None:
        self.validate()

    # -- derived quantities -------------------------------------------------------------
    def importance(self, criterion: str = "reap_mass", normalize: str = "none") -> dict[int, np.ndarray]:
        """Per-layer importance arrays (float64, >= 0) from a named criterion and normalisation."""
        if criterion not in CRITERIA:
            raise ScoresError(f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)}")
        if normalize not in NORMALIZATIONS:
            raise ScoresError(
                f"unknown normalisation {normalize!r}; choose one of {sorted(NORMALIZATIONS)}"
            )
        if criterion in OPTIONAL_STATS and not self.has_criterion(criterion):
            raise ScoresError(
                f"criterion {criterion!r} is not in this scores file (calibrated before GRAPE recorded "
                "it, or with --no-reconstruction / --subsample 0); re-run `grape calibrate`, or choose "
                f"one of {sorted(c for c in CRITERIA if c not in OPTIONAL_STATS)}")
        out = {}
        for idx, layer in sorted(self.layers.items()):
            value = np.asarray(CRITERIA[criterion](layer.stats, self.tokens), dtype=np.float64)
            out[idx] = NORMALIZATIONS[normalize](value, layer)
        return out

    def has_criterion(self, criterion: str) -> bool:
        """Whether `criterion` can be computed from this file (optional statistics may be absent)."""
        if criterion not in CRITERIA:
            return False
        return criterion not in OPTIONAL_STATS or all(criterion in ls.stats for ls in self.layers.values())

    def similarity(self, kind: str) -> dict[int, np.ndarray]:
        missing = [i for i, layer in self.layers.items() if kind not in layer.similarity]
        if missing:
            have = sorted({k for layer in self.layers.values() for k in layer.similarity})
            raise ScoresError(
                f"similarity {kind!r} is missing for layers {missing[:5]}; this scores file has "
                f"{have or 'no similarity'}. Re-run calibration with that similarity enabled."
            )
        return {i: layer.similarity[kind] for i, layer in sorted(self.layers.items())}

    def fingerprint(self) -> str:
        """A short hash of the statistics, recorded in plans for provenance."""
        digest = hashlib.sha256(json.dumps(self.model.to_json(), sort_keys=True).encode())
        for idx, layer in sorted(self.layers.items()):
            for name in STAT_NAMES:
                digest.update(np.ascontiguousarray(layer.stats[name], dtype=np.float64).tobytes())
        return digest.hexdigest()[:16]

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        self.model.validate()
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, (int, np.integer)) or self.tokens < 0:
            raise ScoresError(f"`tokens` must be a whole number >= 0, got {self.tokens!r}")
        if sorted(self.layers) != self.model.moe_layers:
            raise ScoresError(
                f"scores cover layers {sorted(self.layers)} but the model identity lists MoE "
                f"layers {self.model.moe_layers}"
            )
        for idx, layer in self.layers.items():
            n = self.model.experts_per_layer[idx]
            for name in STAT_NAMES + tuple(k for k in OPTIONAL_STATS if k in layer.stats):
                if name not in layer.stats:
                    raise ScoresError(f"layer {idx}: statistic {name!r} is missing")
                arr = _numeric(layer.stats[name], f"layer {idx}: statistic {name!r}")
                if arr.shape != (n,):
                    raise ScoresError(f"layer {idx}: {name} has shape {arr.shape}, expected ({n},)")
                if not np.all(np.isfinite(arr)):
                    bad = np.flatnonzero(~np.isfinite(arr))[:5].tolist()
                    raise ScoresError(
                        f"layer {idx}: statistic {name!r} has NaN/inf for experts {bad}; "
                        "calibration overflowed or saw no tokens. Re-run calibration in a wider "
                        "dtype (float32) or with more data."
                    )
                if np.any(arr < 0):
                    raise ScoresError(f"layer {idx}: statistic {name!r} has negative values")
            sizes = _numeric(layer.expert_bytes, f"layer {idx}: expert_bytes")
            if sizes.shape != (n,):
                raise ScoresError(f"layer {idx}: expert_bytes has shape {sizes.shape}, expected ({n},)")
            if not np.all(np.isfinite(sizes)) or np.any(sizes < 0):
                raise ScoresError(f"layer {idx}: expert_bytes must be finite and >= 0 (sizes in bytes)")
            energy = float(layer.output_energy)
            if not (np.isfinite(energy) and energy >= 0):
                raise ScoresError(f"layer {idx}: output_energy {energy} must be finite and >= 0")
            for kind, sim in layer.similarity.items():
                sim = _numeric(sim, f"layer {idx}: similarity {kind!r}")
                if sim.shape != (n, n) or not np.all(np.isfinite(sim)):
                    raise ScoresError(
                        f"layer {idx}: similarity {kind!r} must be a finite ({n}, {n}) matrix"
                    )
            if layer.cost_curve is not None:
                curve = _numeric(layer.cost_curve, f"layer {idx}: cost_curve")
                if curve.shape != (n + 1,) or not np.all(np.isfinite(curve)):
                    raise ScoresError(f"layer {idx}: cost_curve must be a finite array of shape ({n + 1},)")
            if layer.nll_curve is not None:
                curve = _numeric(layer.nll_curve, f"layer {idx}: nll_curve")
                if curve.shape != (n + 1,) or not np.all(np.isfinite(curve)):
                    raise ScoresError(f"layer {idx}: nll_curve must be a finite array of shape ({n + 1},)")
        if self.sizes is not None:
            self.sizes.validate(self.model.num_hidden_layers, self.model.experts_per_layer)

    # -- file round trip ----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, np.ndarray] = {}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_json(),
            "tokens": int(self.tokens),
            "calibration": self.calibration,
            "created_by": self.created_by,
        }
        if self.sizes is not None:
            meta["sizes"] = self.sizes.to_json()
            for idx, params in self.sizes.expert_params.items():
                arrays[f"layer{idx}/expert_params"] = np.asarray(params, dtype=np.int64)
        arrays["__meta__"] = np.array(json.dumps(meta))
        for idx, layer in sorted(self.layers.items()):
            prefix = f"layer{idx}/"
            for name in STAT_NAMES + tuple(k for k in OPTIONAL_STATS if k in layer.stats):
                arrays[prefix + name] = np.asarray(layer.stats[name], dtype=np.float64)
            arrays[prefix + "expert_bytes"] = np.asarray(layer.expert_bytes, dtype=np.int64)
            arrays[prefix + "output_energy"] = np.array(float(layer.output_energy))
            for kind, sim in layer.similarity.items():
                arrays[prefix + f"similarity/{kind}"] = np.asarray(sim, dtype=np.float64)
            if layer.cost_curve is not None:
                arrays[prefix + "cost_curve"] = np.asarray(layer.cost_curve, dtype=np.float64)
            if layer.nll_curve is not None:
                arrays[prefix + "nll_curve"] = np.asarray(layer.nll_curve, dtype=np.float64)
        with atomic_open(path, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Scores":
        if not os.path.exists(path):
            raise ScoresError(f"scores file {str(path)!r} does not exist")
        if os.path.isdir(path):
            raise ScoresError(f"{str(path)!r} is a directory, not a scores file (.npz)")
        # a device (/dev/zero) or a pipe: numpy would read it forever, or not at all
        require_regular(path, "scores file (.npz)", ScoresError)
        try:
            archive = np.load(path, allow_pickle=False)
            meta = json.loads(str(archive["__meta__"]))
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a scores file"
            raise ScoresError(
                f"{str(path)!r} is not a GRAPE scores file ({_reason(exc)}); create one with "
                "`grape calibrate` or `grape synth`"
            ) from exc
        if not isinstance(meta, dict):
            raise ScoresError(f"{str(path)!r} is not a GRAPE scores file (its metadata is not an object)")
        try:
            return cls._from_archive(path, archive, meta)
        except ScoresError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged or hand-edited file: say which
            raise ScoresError(
                f"{str(path)!r} is a damaged GRAPE scores file ({_reason(exc)}); re-create it with "
                "`grape calibrate` or `grape synth`"
            ) from exc

    @classmethod
    def _from_archive(cls, path, archive, meta: dict) -> "Scores":
        if meta.get("format") != FORMAT:
            raise ScoresError(f"{str(path)!r} is not a GRAPE scores file (format {meta.get('format')!r})")
        if not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > VERSION:
            raise ScoresError(
                f"{str(path)!r} has scores format version {meta['version']}; this GRAPE reads up "
                f"to {VERSION}. Upgrade GRAPE."
            )
        for key in ("model", "tokens"):
            if key not in meta:
                raise ScoresError(f"{str(path)!r}: the metadata has no {key!r} entry; re-create the "
                                  "file with `grape calibrate` or `grape synth`")
        model = ModelIdentity.from_json(meta["model"])
        layers = {}
        for idx in model.moe_layers:
            prefix = f"layer{idx}/"
            sims = {
                key[len(prefix + "similarity/"):]: archive[key]
                for key in archive.files
                if key.startswith(prefix + "similarity/")
            }
            layers[idx] = LayerScores(
                layer=idx,
                stats={name: archive[prefix + name] for name in STAT_NAMES + OPTIONAL_STATS
                       if name in STAT_NAMES or prefix + name in archive.files},
                expert_bytes=archive[prefix + "expert_bytes"],
                output_energy=float(archive[prefix + "output_energy"]),
                similarity=sims,
                cost_curve=archive[prefix + "cost_curve"] if prefix + "cost_curve" in archive.files else None,
                nll_curve=archive[prefix + "nll_curve"] if prefix + "nll_curve" in archive.files else None,
            )
        return cls(
            model=model,
            layers=layers,
            tokens=meta["tokens"],
            calibration=meta.get("calibration", {}),
            created_by=meta.get("created_by", ""),
            sizes=ModelSizes.from_json(meta["sizes"], {
                idx: archive[f"layer{idx}/expert_params"] for idx in model.moe_layers
            }) if meta.get("sizes") else None,
        )
