"""A model whose MoE layers keep different numbers of experts (or masked ones), written by GRAPE.

transformers builds every MoE layer with the one expert count in config.json; this subclass
builds the stock model, then applies the `grape_pruning` block of its config (grape_pruning.py:
per-layer counts and top_k, router masks) before the weights are loaded, so
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` gives the pruned model
exactly. It needs only transformers and torch, not GRAPE; `grape.load(path)` applies the same
hook without remote code.
"""

import transformers

from .grape_moe_aux import install_uneven_aux_loss
from .grape_pruning import apply_block

# filled in by GRAPE when the checkpoint is written
BASE_ARCHITECTURE = "__GRAPE_BASE_ARCHITECTURE__"
ROUTER_ATTR = "__GRAPE_ROUTER_ATTR__"
# the decoder layer's attribute holding the MoE block (mlp; feed_forward, mixer in some families)
BLOCK_ATTR = "__GRAPE_BLOCK_ATTR__"

_Base = getattr(transformers, BASE_ARCHITECTURE)


class GrapePrunedForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        uneven = apply_block(config, lambda layer: getattr(self.model.layers[layer], BLOCK_ATTR), ROUTER_ATTR)
        if uneven:  # layers of different sizes: the stock balancing loss cannot cope
            install_uneven_aux_loss(self, ROUTER_ATTR, BLOCK_ATTR)
