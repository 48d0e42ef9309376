"""The `grape synth --shape` shapes of the families added for issue 24 (solvers/synth.py): each
builds synthetic scores of the published shape and solves exactly to a plan the checker accepts;
the flagships' expert bytes and, where recorded, the model's total size are their configs'."""

import pytest

from solvers.check import check_plan
from solvers.problem import build_problem
from solvers.solve import solve
from solvers.synth import SHAPES, synth_scores

NEW_SHAPES = {  # name: (MoE layers, routed experts, top_k)
    "glm-4.5-air": (45, 128, 8),
    "minimax-m2": (62, 256, 8),
    "qwen3-next-80b-a3b": (48, 512, 10),
    "llama-4-scout": (48, 16, 1),
    "ernie-4.5-21b-a3b": (27, 64, 6),
    "deepseek-v3.2": (58, 256, 8),
    "glm-4.6": (89, 160, 8),
    "llama-4-maverick": (24, 128, 1),
    "ernie-4.5-300b-a47b": (51, 64, 8),
    "gemma-4-26b-a4b": (30, 128, 8),
    "qwen3.5-397b-a17b": (60, 512, 10),
    "glm-5": (75, 256, 8),
    "mimo-v2-flash": (47, 256, 8),
    "solar-open-100b": (48, 128, 8),
    "beam-1.0-501b-a23b": (49, 256, 8),
    "ling-3.0-flash": (40, 512, 8),
    "minimax-m3": (60, 128, 4),
}
# the shapes whose configs route within groups (n_group, topk_group), which the solver keeps
# balanced as it does DeepSeek-V3's
GROUPED = {"deepseek-v3.2": (8, 4), "beam-1.0-501b-a23b": (8, 4), "ling-3.0-flash": (8, 4)}
# bf16 bytes of one routed expert (3 x hidden x moe_intermediate x 2) and total parameters in
# billions (the releases' names: 355B with GLM's multi-token-prediction layer, 400B, 300B)
FLAGSHIPS = {
    "glm-4.6": (3 * 5120 * 1536 * 2, 352.8),
    "llama-4-maverick": (3 * 5120 * 8192 * 2, 400.7),
    "ernie-4.5-300b-a47b": (3 * 8192 * 3584 * 2, 298.6),
    "gemma-4-26b-a4b": (3 * 2816 * 704 * 2, None),
    "qwen3.5-397b-a17b": (3 * 4096 * 1024 * 2, None),
    "glm-5": (3 * 6144 * 2048 * 2, None),
    "minimax-m3": (3 * 6144 * 3072 * 2, None),
}


@pytest.mark.parametrize("name", sorted(NEW_SHAPES))
def test_new_family_shape_builds_and_solves(name):
    layers, experts, top_k = NEW_SHAPES[name]
    shape = SHAPES[name]
    assert (len(shape.moe_layers), shape.experts, shape.top_k) == (layers, experts, top_k)
    scores = synth_scores(name)
    assert scores.model.model_type == shape.model_type
    problem = build_problem(scores, 0.25)
    plan = solve(problem, "exact")
    assert check_plan(plan, problem) == []
    assert plan.num_removed == layers * experts // 4
    assert all(len(kept) >= top_k for kept in plan.kept.values())
    groups = GROUPED.get(name)
    assert (scores.model.n_group or 1, scores.model.topk_group or 1) == (groups or (1, 1))


@pytest.mark.parametrize("name", sorted(FLAGSHIPS))
def test_flagship_shape_bytes(name):
    expert_bytes, billions = FLAGSHIPS[name]
    shape = SHAPES[name]
    scores = synth_scores(name, similarity=False, cost_curve=False)
    sizes = {int(b) for layer in scores.layers.values() for b in layer.expert_bytes}
    assert sizes == {expert_bytes}
    if name == "llama-4-maverick":  # interleave_moe_layer_step 2: MoE on the odd layers
        assert shape.moe_layers == list(range(1, 48, 2))
    if billions is None:  # no dense-part description (see solvers/synth.py)
        assert scores.sizes is None
        return
    sizes = scores.sizes.to_json()
    params = sum(part[1] for part in sizes["layers"].values()) + sizes["embed"][1]
    params += 0 if sizes["tied"] else sizes["head"][1]
    params += shape.total_experts * expert_bytes // 2
    assert params / 1e9 == pytest.approx(billions, abs=0.05)
