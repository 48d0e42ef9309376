"""Why GRAPE refuses the MoE model types of transformers it has no adapter for. get_adapter
raises these lines; scripts/moe_families.py lists every MoE model type with its line
(docs/families.md). A type that gains an adapter is simply no longer refused."""

from grape.models.adapters.base import refuse_model_types

_MULTIMODAL = ("a multimodal wrapper (vision/audio towers; the expert counts live in its "
               "text_config): GRAPE prunes text-only decoders")
_NOT_FUSED = ("its experts are not the transformers v5 fused experts interface "
              "(experts(hidden, top_k_index, top_k_weights)), which GRAPE's surgery and "
              "calibration rely on")
_ENCODER_DECODER = "an encoder-decoder / non-generative MoE; GRAPE prunes decoder-only causal LMs"


def _text_of(text_type: str) -> str:
    return f"{_MULTIMODAL}; load the text decoder as {text_type!r}, which GRAPE supports"


refuse_model_types({
    # multimodal wrappers
    **dict.fromkeys(("deepseek_ocr2", "diffusion_gemma", "ernie4_5_vl_moe", "glm4v_moe",
                     "glm5_next", "hy_v4_vl", "inkling2", "inkling2_loop", "inkling_mm_model",
                     "mistral4", "mistral_large4", "muse_spark", "qwen3_omni_moe",
                     "qwen3_omni_moe_thinker", "qwen3_vl_moe", "step3p7", "unlimited_ocr",
                     "gemma4"), _MULTIMODAL),
    **{wrapper: _text_of(text) for wrapper, text in (
        ("qwen3_5_moe", "qwen3_5_moe_text"), ("llama4", "llama4_text"), ("aria", "aria_text"),
        ("minimax_m3_vl", "minimax_m3_vl_text"), ("dots3_note", "dots3_note_text"),
        ("qwen4_exp", "qwen4_exp_text"))},
    # not decoder-only LMs
    **dict.fromkeys(("switch_transformers", "nllb-moe", "openai_privacy_filter"), _ENCODER_DECODER),
    "vitpose_backbone": "a vision backbone with per-dataset expert heads, not a routed-MoE language model",
    # special routing or layout
    "hunyuan_v1_moe": ("Hunyuan's router projection is a child module (gate.wg) and its "
                       "expert counts may be per-layer lists; neither is handled yet"),
    "afmoe": ("AFMoE's router projection is a child module (router.gate) fed the block's "
              "expert_bias; not handled yet"),
    "deepseek_v4": ("DeepSeek-V4's first layers are hash-routed (the expert is a function of the "
                    "token id) and the others use sqrt-softplus scores; neither routing is "
                    "handled yet"),
    "gemma4_text": ("Gemma-4's routed experts are attributes of the decoder layer itself, beside "
                    "a dense MLP, not a separate MoE block; it needs its own adapter"),
    "longcat_flash": ("LongCat-Flash routes to zero-computation (identity) experts as well as "
                      "real ones, and " + _NOT_FUSED),
    "zaya": ("ZAYA1's router is an MLP over router states carried from layer to layer, and it "
             "routes to a zero-computation skip expert besides the real ones; neither is handled"),
    "inkling_text": ("Inkling's router projection holds the shared experts' rows after the routed "
                     "ones ([routed + shared, H]) and normalises the chosen weights together with "
                     "the shared experts'; GRAPE slices router tensors whose first axis is the "
                     "routed-expert count"),
    "inkling2_text": ("Inkling-2's decoder layers pass block-attention-residual states "
                      "(block_states) from layer to layer, which layer-sequential calibration does "
                      "not carry, so it would measure other routing than the model's; not handled "
                      "yet"),
    "inkling2_loop_text": ("Inkling-2-Loop's loop layers run their MoE block once per loop pass "
                           "(several times per token) and its layers pass block-attention-residual "
                           "states (block_states) from layer to layer; neither is handled yet"),
    "doge": "Doge's CDMoE experts are retrieved product-key embedding rows, not routed FFN experts",
    **dict.fromkeys(("dbrx", "jetmoe"), f"{_NOT_FUSED}"),
})
