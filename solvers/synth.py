"""Synthetic scores shaped like real calibration output, for every real model shape.

The numbers are invented but follow what calibration on real MoE models shows:

* heavy-tailed routing: per-layer expert frequencies are a softmax of Gaussian logits, so a few
  experts take many tokens and a few are almost dead; deeper layers are more skewed;
* depth trends: expert output norms and the MoE block's output energy grow with depth;
* block-structured similarity: experts fall into clusters of near-duplicates (high CKA inside
  a cluster), on top of a layer-wide baseline that rises with depth, plus symmetric noise;
* cost curves: the block-output error of keeping the n most important experts, a convex
  decreasing curve in n that is zero when every expert is kept.

Everything is seeded; the result is a :class:`solvers.scores.Scores`, so ``save`` writes the very
same file format calibration writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers.errors import UserError
from solvers.scores import LayerScores, ModelIdentity, Scores
from solvers.sizes import KVShape, ModelSizes, Part


@dataclass(frozen=True)
class ModelShape:
    """The routed-expert shape of a real model (reference facts, section 4)."""

    name: str
    model_type: str
    num_hidden_layers: int
    first_moe_layer: int  # earlier decoder layers are dense
    experts: int
    top_k: int
    shared: int
    hidden: int
    expert_intermediate: int
    n_group: int | None = None
    topk_group: int | None = None
    moe_step: int = 1  # MoE on every moe_step-th layer from first_moe_layer (Llama-4 Maverick: 2)

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_moe_layer, self.num_hidden_layers, self.moe_step))

    @property
    def expert_bytes(self) -> int:
        """bf16 bytes of one routed expert: gate, up and down projections."""
        return 3 * self.hidden * self.expert_intermediate * 2

    @property
    def total_experts(self) -> int:
        return len(self.moe_layers) * self.experts


SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("mixtral-8x7b", "mixtral", 32, 0, 8, 2, 0, 4096, 14336),
        ModelShape("mixtral-8x22b", "mixtral", 56, 0, 8, 2, 0, 6144, 16384),
        ModelShape("deepseek-moe-16b", "deepseek", 28, 1, 64, 6, 2, 2048, 1408),
        ModelShape("qwen1.5-moe-a2.7b", "qwen2_moe", 24, 0, 60, 4, 1, 2048, 1408),
        ModelShape("olmoe-1b-7b", "olmoe", 16, 0, 64, 8, 0, 2048, 1024),
        ModelShape("gpt-oss-20b", "gpt_oss", 24, 0, 32, 4, 0, 2880, 2880),
        ModelShape("gpt-oss-120b", "gpt_oss", 36, 0, 128, 4, 0, 2880, 2880),
        ModelShape("qwen3-30b-a3b", "qwen3_moe", 48, 0, 128, 8, 0, 2048, 768),
        ModelShape("qwen3-235b-a22b", "qwen3_moe", 94, 0, 128, 8, 0, 4096, 1536),
        ModelShape("qwen3-coder-480b", "qwen3_moe", 62, 0, 160, 8, 0, 6144, 2560),
        ModelShape("deepseek-v3", "deepseek_v3", 61, 3, 256, 8, 1, 7168, 2048, 8, 4),
        ModelShape("kimi-k2", "kimi_k2", 61, 1, 384, 8, 1, 7168, 2048, 1, 1),
        # the defaults of transformers 5.24's config classes, which reproduce these releases'
        # config.json (the class docstrings name them; Glm4MoeConfig's defaults are GLM-4.5-Air's,
        # MiniMaxM2Config's are MiniMax-M2's)
        ModelShape("glm-4.5-air", "glm4_moe", 46, 1, 128, 8, 1, 4096, 1408, 1, 1),
        ModelShape("minimax-m2", "minimax_m2", 62, 0, 256, 8, 0, 3072, 1536),
        ModelShape("qwen3-next-80b-a3b", "qwen3_next", 48, 0, 512, 10, 1, 2048, 512),
        ModelShape("llama-4-scout", "llama4_text", 48, 0, 16, 1, 1, 5120, 8192),
        ModelShape("ernie-4.5-21b-a3b", "ernie4_5_moe", 28, 1, 64, 6, 2, 2560, 1536),
        ModelShape("deepseek-v3.2", "deepseek_v32", 61, 3, 256, 8, 1, 7168, 2048, 8, 4),
        # the releases' own config.json: GLM-4.6 (zai-org; GLM-4.5 and 4.7 have the same
        # shape), Llama-4 Maverick (text_config: interleave_moe_layer_step 2, so MoE on the odd
        # layers), ERNIE-4.5-300B-A47B (moe_layer_start_index 3 to the last layer), Gemma-4
        # 26B-A4B (text_config: every layer's dense MLP beside its experts is the shared one)
        ModelShape("glm-4.6", "glm4_moe", 92, 3, 160, 8, 1, 5120, 1536, 1, 1),
        ModelShape("llama-4-maverick", "llama4_text", 48, 1, 128, 1, 1, 5120, 8192, moe_step=2),
        ModelShape("ernie-4.5-300b-a47b", "ernie4_5_moe", 54, 3, 64, 8, 0, 8192, 3584),
        ModelShape("gemma-4-26b-a4b", "gemma4_text", 30, 0, 128, 8, 1, 2816, 704),
        # Qwen3.5-397B-A17B, the Qwen3.5 flagship: its model card (60 layers, hidden 4096, 512
        # experts, 10 routed + 1 shared, expert intermediate 1024), which the text_config
        # figures quoted by public inference code match (transformers' Qwen3_5MoeTextConfig
        # defaults are the 35B-A3B's, not the flagship's)
        ModelShape("qwen3.5-397b-a17b", "qwen3_5_moe_text", 60, 0, 512, 10, 1, 4096, 1024),
        # the defaults of transformers 5.24's config classes, whose docstrings name the release:
        # GlmMoeDsaConfig zai-org/GLM-5 (3 dense layers), MiMoV2FlashConfig
        # XiaomiMiMo/MiMo-V2-Flash (1 dense layer, no shared expert), SolarOpenConfig
        # upstage/Solar-Open-100B (MoE on every layer), BeamConfig reflection/Beam-1.0-501B-A23B
        # (3 dense layers, no shared expert, 8 routing groups of which 4 are chosen),
        # BailingHybridConfig inclusionAI/Ling-3.0-Flash (first_k_dense_replace 2,
        # num_expert_group 8, topk_group 4), MiniMaxM3VLTextConfig MiniMaxAI/MiniMax-M3 (every
        # layer sparse; one shared expert of shared_intermediate_size 3072)
        ModelShape("glm-5", "glm_moe_dsa", 78, 3, 256, 8, 1, 6144, 2048, 1, 1),
        ModelShape("mimo-v2-flash", "mimo_v2_flash", 48, 1, 256, 8, 0, 4096, 2048, 1, 1),
        ModelShape("solar-open-100b", "solar_open", 48, 0, 128, 8, 1, 4096, 1280, 1, 1),
        ModelShape("beam-1.0-501b-a23b", "beam", 52, 3, 256, 8, 0, 5120, 2560, 8, 4),
        ModelShape("ling-3.0-flash", "bailing_hybrid", 42, 2, 512, 8, 1, 2560, 768, 8, 4),
        ModelShape("minimax-m3", "minimax_m3_vl_text", 60, 0, 128, 4, 1, 6144, 3072),
    )
}


@dataclass(frozen=True)
class Dense:
    """What a real model holds besides its routed experts, from its published config.json: the
    attention (GQA, or DeepSeek's MLA), norms, router, shared experts, dense layers, embeddings."""

    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dense_intermediate: int = 0  # MLP of the leading dense layers
    shared_intermediate: int = 0  # the shared experts of a MoE layer, together
    mla: tuple[int, int, int, int, int] | None = None  # q_lora, kv_lora, qk_nope, qk_rope, v_head
    qk_norm: int = 0  # elements of the q/k norm weights of a layer
    qkv_bias: bool = False
    o_bias: bool = False
    sinks: bool = False  # gpt-oss: one attention sink per head
    window: int | None = None  # gpt-oss: a sliding window on every other layer, from layer 0
    router_bias: bool = False  # a per-expert router bias (gpt-oss, DeepSeek-V3's correction bias)
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate of the shared expert
    tied: bool = False

    def attention_params(self, hidden: int) -> int:
        if self.mla is not None:
            q_lora, kv_lora, nope, rope, v_head = self.mla
            q = hidden * q_lora + q_lora + q_lora * self.heads * (nope + rope) if q_lora else \
                hidden * self.heads * (nope + rope)
            kv = hidden * (kv_lora + rope) + kv_lora + kv_lora * self.heads * (nope + v_head)
            return q + kv + self.heads * v_head * hidden
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = (q + 2 * kv if self.qkv_bias else 0) + (hidden if self.o_bias else 0)
        return 2 * hidden * q + 2 * hidden * kv + bias + self.qk_norm + (self.heads if self.sinks else 0)

    def kv(self, layers: int) -> KVShape:
        if self.mla is not None:
            return KVShape((self.mla[1] + self.mla[3],) * layers, (None,) * layers, 1)
        windows = tuple(self.window if self.window and i % 2 == 0 else None for i in range(layers))
        return KVShape((2 * self.kv_heads * self.head_dim,) * layers, windows, self.kv_heads)


# real configs (Hugging Face config.json of each release)
DENSE: dict[str, Dense] = {
    "mixtral-8x7b": Dense(32, 8, 128, 32000),
    "mixtral-8x22b": Dense(48, 8, 128, 32768),
    "deepseek-moe-16b": Dense(16, 16, 128, 102400, dense_intermediate=10944,
                              shared_intermediate=2 * 1408),
    "qwen1.5-moe-a2.7b": Dense(16, 16, 128, 151936, shared_intermediate=5632, qkv_bias=True,
                               shared_gate=True),
    "olmoe-1b-7b": Dense(16, 16, 128, 50304, qk_norm=2 * 2048),
    "gpt-oss-20b": Dense(64, 8, 64, 201088, qkv_bias=True, o_bias=True, sinks=True, window=128,
                         router_bias=True),
    "gpt-oss-120b": Dense(64, 8, 64, 201088, qkv_bias=True, o_bias=True, sinks=True, window=128,
                          router_bias=True),
    "qwen3-30b-a3b": Dense(32, 4, 128, 151936, qk_norm=2 * 128),
    "qwen3-235b-a22b": Dense(64, 4, 128, 151936, qk_norm=2 * 128),
    "qwen3-coder-480b": Dense(96, 8, 128, 151936, qk_norm=2 * 128),
    "deepseek-v3": Dense(128, 128, 0, 129280, dense_intermediate=18432, shared_intermediate=2048,
                         mla=(1536, 512, 128, 64, 128), router_bias=True),
    "kimi-k2": Dense(64, 64, 0, 163840, dense_intermediate=18432, shared_intermediate=2048,
                     mla=(1536, 512, 128, 64, 128), router_bias=True),
    # attention_bias and use_qk_norm true; the correction bias of a sigmoid router
    "glm-4.6": Dense(96, 8, 128, 151552, dense_intermediate=12288, shared_intermediate=1536,
                     qk_norm=2 * 128, qkv_bias=True, router_bias=True),
    # dense layers: intermediate_size_mlp; the shared expert: intermediate_size; no biases
    "llama-4-maverick": Dense(40, 8, 128, 202048, dense_intermediate=16384,
                              shared_intermediate=8192),
    # the correction bias (gate.moe_statics); tie_word_embeddings true
    "ernie-4.5-300b-a47b": Dense(64, 8, 128, 103424, dense_intermediate=28672, router_bias=True,
                                 tied=True),
    # (Gemma-4 26B-A4B has none: its global-attention layers differ from its sliding ones in head
    # size and key/value heads, and Dense describes one attention for every layer)
}


def shape_sizes(shape: ModelShape, expert_bytes: int) -> ModelSizes | None:
    """The sizes a checkpoint of `shape` would record, in bf16 (None for a shape not in DENSE)."""
    dense = DENSE.get(shape.name)
    if dense is None:
        return None
    h, moe = shape.hidden, set(shape.moe_layers)
    attention = dense.attention_params(h) + 2 * h  # plus the two layer norms
    router = shape.experts * h + (shape.experts if dense.router_bias else 0)
    moe_other = router + 3 * h * dense.shared_intermediate + (h if dense.shared_gate else 0)
    layers = {
        i: 2 * (attention + (moe_other if i in moe else 3 * h * dense.dense_intermediate))
        for i in range(shape.num_hidden_layers)
    }
    return ModelSizes(
        dtype="bfloat16", quantization=None, source="synthetic",
        layers={i: Part(b, b // 2) for i, b in layers.items()},
        embed=Part(2 * dense.vocab * h, dense.vocab * h),
        head=Part(2 * (dense.vocab * h + h), dense.vocab * h + h), tied=dense.tied,
        kv=dense.kv(shape.num_hidden_layers),
        expert_params={i: np.full(shape.experts, expert_bytes // 2, dtype=np.int64) for i in moe},
    )


def get_shape(name: str) -> ModelShape:
    key = name.lower()
    if key not in SHAPES:
        raise UserError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[key]


def custom_shape(layers: int, experts: int, top_k: int = 2, name: str = "custom") -> ModelShape:
    """A small shape for tests: `layers` MoE layers of `experts` experts each."""
    return ModelShape(name, "synthetic", layers, 0, experts, top_k, 0, 64, 32)


def _similarity(rng: np.random.Generator, n: int, depth: float) -> np.ndarray:
    """Block-structured symmetric similarity in [0, 1] with a unit diagonal."""
    clusters = max(2, n // 4)
    # uneven cluster sizes: a few big families of near-duplicates, many singletons
    weights = rng.dirichlet(np.full(clusters, 0.7))
    label = rng.choice(clusters, size=n, p=weights)
    base = 0.15 + 0.3 * depth + 0.05 * np.sin(7.0 * depth)
    strength = rng.uniform(0.5, 1.0, size=clusters)
    same = label[:, None] == label[None, :]
    sim = base + 0.45 * same * np.sqrt(np.outer(strength[label], strength[label]))
    noise = rng.normal(0.0, 0.05, size=(n, n))
    sim = np.clip(sim + (noise + noise.T) / 2.0, 0.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def _layer(
    rng: np.random.Generator,
    shape: ModelShape,
    layer: int,
    depth: float,
    tokens: int,
    with_similarity: bool,
    with_cost_curve: bool,
) -> LayerScores:
    n, k = shape.experts, shape.top_k
    skew = 0.8 + 0.7 * depth  # later layers route more unevenly
    logits = rng.normal(0.0, skew, size=n)
    share = np.exp(logits - logits.max())
    share = share / share.sum() * k  # each token visits k experts
    count = np.floor(tokens * share)
    gate = np.clip(rng.lognormal(np.log(1.0 / k), 0.3, size=n), 1e-3, 1.0)
    norm = (1.0 + 3.0 * depth**2) * rng.lognormal(0.0, 0.4, size=n)
    spread = rng.uniform(0.1, 0.5, size=n)  # per-expert coefficient of variation of g*||f||
    stats = {
        "count": count,
        "gate_sum": count * gate,
        "norm_sum": count * norm,
        "gate_norm_sum": count * gate * norm,
        "gate_norm_sq_sum": count * (gate * norm) ** 2 * (1.0 + spread**2),
        "norm_max": norm * (2.0 + rng.lognormal(0.0, 0.3, size=n)),
    }
    energy = float((stats["gate_norm_sum"].sum() / tokens) ** 2 * rng.uniform(0.6, 0.9))
    sims = {"cka": _similarity(rng, n, depth)} if with_similarity else {}
    curve = None
    if with_cost_curve:
        # error of keeping the n heaviest experts: the removed output mass, made convex
        mass = np.sort(stats["gate_norm_sum"])[::-1]
        removed_share = 1.0 - np.concatenate([[0.0], np.cumsum(mass)]) / max(mass.sum(), 1e-30)
        curve = energy * np.clip(removed_share, 0.0, 1.0) ** 1.3
        curve[-1] = 0.0
    per_expert = shape.expert_bytes
    if shape.model_type == "gpt_oss":  # biases of gate_up and down
        per_expert += (2 * shape.expert_intermediate + shape.hidden) * 2
    return LayerScores(
        layer=layer,
        stats=stats,
        expert_bytes=np.full(n, per_expert, dtype=np.int64),
        output_energy=energy,
        similarity=sims,
        cost_curve=curve,
    )


def synth_scores(
    shape: str | ModelShape,
    seed: int = 0,
    tokens: int = 1 << 21,
    similarity: bool = True,
    cost_curve: bool = True,
) -> Scores:
    """Synthetic scores of a real model shape (a name from :data:`SHAPES`, or a ModelShape)."""
    shape = get_shape(shape) if isinstance(shape, str) else shape
    rng = np.random.default_rng(seed)
    layers = {}
    moe = shape.moe_layers
    for pos, layer in enumerate(moe):
        depth = pos / max(len(moe) - 1, 1)
        layers[layer] = _layer(rng, shape, layer, depth, tokens, similarity, cost_curve)
    ident = ModelIdentity(
        model_type=shape.model_type,
        num_hidden_layers=shape.num_hidden_layers,
        experts_per_layer={layer: shape.experts for layer in moe},
        top_k={layer: shape.top_k for layer in moe},
        fingerprint="",
        name_or_path=f"synthetic:{shape.name}",
        n_group=shape.n_group,
        topk_group=shape.topk_group,
    )
    return Scores(
        model=ident,
        layers=layers,
        tokens=tokens,
        calibration={"synthetic": True, "shape": shape.name, "seed": seed},
        created_by="grape synth",
        sizes=shape_sizes(shape, int(layers[moe[0]].expert_bytes[0])),
    )
