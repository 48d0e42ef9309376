"""Prune, then repair (grape.pruning.repair): the repaired layers reconstruct the original layers' outputs
better than plain removal on the fitting tokens (measured here independently of the report),
only the kept experts' down projections change, the checkpoint reloads to the same logits, repair
none is plain removal bit for bit, and bad requests fail in one line before any forward."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from tiny_models import make_tiny, tiny_input_ids

from cli_workspace import make_workspace
from grape.models.adapters import get_adapter
from grape.pruning.checkpoint import load_pruned, save_pruned
from grape.cli.main import main as grape_main
from grape.errors import ArchitectureError, DataError, PlanError
from grape.pruning.apply import ApplyConfig, apply_plan
from grape.pruning.repair import RepairSettings, prune_and_repair
from grape.pruning.repair_fit import Routing, scale_statistics, solve_scales
from solvers.plan import Plan

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
# DeepSeek tiny model: 8 experts in 2 groups of 4, so [0, 2, 5, 7] keeps 2 per group
OVERRIDES = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
IDS = tiny_input_ids(batch=8, seq=32)


def build(family: str):
    return make_tiny(family, **OVERRIDES.get(family, {}))


def half_plan(model, kept=(0, 2, 5, 7)) -> Plan:
    adapter = get_adapter(model)
    keep = {layer: list(kept) for layer in adapter.moe_blocks()}
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in k] for layer, k in keep.items()}
    return Plan(kept=keep, removed=removed, model=adapter.identity().to_json())


def plain(model, plan):
    return apply_plan(copy.deepcopy(model), plan, ApplyConfig("remove"))


def repaired(model, plan, method, **settings):
    model = copy.deepcopy(model)
    report = prune_and_repair(model, plan, ApplyConfig(repair=method), IDS, settings=RepairSettings(**settings))
    return model, report


def block_io(model, ids) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE block's (input, output) on `ids`, flattened to tokens, by forward hooks."""
    seen = {}
    handles = [block.register_forward_hook(
        lambda _m, args, out, layer=layer: seen.__setitem__(
            layer, (args[0].reshape(-1, args[0].shape[-1]), (out[0] if isinstance(out, tuple) else out)
                    .reshape(-1, args[0].shape[-1]))))
        for layer, block in get_adapter(model).moe_blocks().items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def block_output(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    block = get_adapter(model).moe_blocks()[layer]
    with torch.no_grad():
        out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


# -- what repair is for ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["scale", "lstsq"])
def test_repair_lowers_each_layers_output_error_on_its_tokens(family, method):
    """Independent of the report: at each pruned layer, on the inputs the repaired model gives
    it, the repaired block is closer to the original block (whole block, shared experts included)
    than the plainly pruned block is."""
    model = build(family)
    plan = half_plan(model)
    fixed, report = repaired(model, plan, method)
    removed = plain(model, plan)
    assert [r.layer for r in report.layers] == plan.layers and all(r.kept_fit for r in report.layers)
    for layer, (x, out) in block_io(fixed, IDS).items():
        target = block_output(model, layer, x)
        before = (block_output(removed, layer, x) - target).pow(2).sum(-1).mean()
        after = (out - target).pow(2).sum(-1).mean()
        assert after < 0.97 * before, (layer, float(before), float(after))
    # lstsq re-fits a whole matrix per expert, scale one number: lstsq fits the tokens better
    if method == "lstsq":
        _, scaled = repaired(model, plan, "scale")
        assert report.relative("after") < scaled.relative("after")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_repair_brings_the_logits_closer_to_the_original_on_the_fitting_tokens(family):
    model = build(family)
    plan = half_plan(model)
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
        base = (plain(model, plan)(input_ids=IDS).logits - reference).pow(2).mean()
        fixed = (repaired(model, plan, "lstsq")[0](input_ids=IDS).logits - reference).pow(2).mean()
    assert fixed < base


def test_the_scales_solve_their_normal_equations():
    """solve_scales against a brute-force least squares over the stacked contributions."""
    model = build("qwen3_moe")
    adapter = get_adapter(plain(model, half_plan(model)))
    x = torch.randn(64, 32)
    routing = Routing(*adapter.route(0, x))
    experts = adapter.experts(0)
    y = torch.randn(64, 32)
    gram, rhs = scale_statistics(experts, x, y, routing, 4)
    columns = []
    for e in range(4):  # column e: routed output with only expert e's weight kept
        weight = torch.where(routing.index == e, routing.weight, torch.zeros_like(routing.weight))
        columns.append(experts(x, routing.index, weight).double().flatten())
    design = torch.stack(columns, 1)
    torch.testing.assert_close(gram, design.T @ design)
    expected = torch.linalg.lstsq(design, y.double().flatten()[:, None]).solution[:, 0]
    torch.testing.assert_close(solve_scales(gram, rhs, 0.0), expected, rtol=1e-6, atol=1e-8)
    # the ridge pulls toward 1 (the unrepaired model)
    strong = solve_scales(gram, rhs, 1e6)
    torch.testing.assert_close(strong, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-4)


# -- the checkpoint stays standard --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["scale", "lstsq"])
def test_only_kept_down_projections_change(method):
    model = build("gpt_oss")  # biases and transposed weights
    plan = half_plan(model)
    removed = plain(model, plan).state_dict()
    fixed = repaired(model, plan, method)[0].state_dict()
    assert list(fixed) == list(removed)
    changed = set()
    for name, tensor in fixed.items():
        assert tensor.shape == removed[name].shape and tensor.dtype == removed[name].dtype, name
        if not torch.equal(tensor, removed[name]):
            changed.add(name.rsplit(".", 1)[-1])
    expected = {"down_proj", "down_proj_bias"} if method == "scale" else {"down_proj"}
    assert changed == expected


def test_repair_none_is_plain_removal_bit_for_bit():
    model = build("qwen3_moe")
    plan = half_plan(model)
    removed = plain(model, plan)
    same = copy.deepcopy(model)
    report = prune_and_repair(same, plan, ApplyConfig(repair="none"), IDS)
    assert report.layers == [] and report.line() == "repair none"
    for (name, a), (_, b) in zip(removed.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    assert same.config.to_dict() == removed.config.to_dict()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_the_repaired_checkpoint_reloads_to_the_same_logits(family, tmp_path):
    model = build(family)
    fixed, _ = repaired(model, half_plan(model), "lstsq")
    save_pruned(fixed, tmp_path / "ckpt", plan=half_plan(model))
    with torch.no_grad():
        expected = fixed(input_ids=IDS).logits
        stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")(input_ids=IDS).logits
        ours = load_pruned(tmp_path / "ckpt")(input_ids=IDS).logits
    torch.testing.assert_close(stock, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_a_non_uniform_plan_and_a_padded_batch_repair_too():
    model = build("mixtral")
    adapter = get_adapter(model)
    kept = dict(zip(sorted(adapter.moe_blocks()), ([0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [3, 4])))
    plan = Plan(kept=kept, removed={l: [e for e in range(8) if e not in k] for l, k in kept.items()})
    mask = torch.ones_like(IDS)
    mask[0, 20:] = 0
    fixed = copy.deepcopy(model)
    report = prune_and_repair(fixed, plan, ApplyConfig(repair="lstsq"), IDS, mask)
    assert report.tokens == IDS.numel() - 12 and all(r.tokens == report.tokens for r in report.layers)
    assert report.relative("after") < report.relative("before")
    assert [get_adapter(fixed).num_experts(l) for l in sorted(kept)] == [4, 6, 2]


def test_a_fit_that_does_not_help_is_undone():
    """A ridge so strong that the scales stay 1 leaves the error where it was, not lower: the fit
    is undone and every layer is exactly plainly pruned."""
    model = build("qwen3_moe")
    plan = half_plan(model)
    fixed, report = repaired(model, plan, "scale", ridge=1e30)
    removed = plain(model, plan)
    assert not any(r.kept_fit for r in report.layers)
    for (name, a), (_, b) in zip(removed.state_dict().items(), fixed.state_dict().items()):
        assert torch.equal(a, b), name


# -- refusals -----------------------------------------------------------------------------------------
def test_bad_requests_are_refused_before_any_work():
    model = build("qwen3_moe")
    plan = half_plan(model)
    with pytest.raises(PlanError, match="unknown repair"):
        ApplyConfig(repair="magic")
    with pytest.raises(PlanError, match="does not combine with --method merge"):
        ApplyConfig("merge", repair="scale")
    with pytest.raises(PlanError, match="needs calibration tokens"):
        apply_plan(copy.deepcopy(model), plan, ApplyConfig(repair="scale"))
    with pytest.raises(PlanError, match="ridge"):
        RepairSettings(ridge=-1.0)
    for bad, phrase in [(IDS.float(), "integer matrix"), (IDS[0], "integer matrix"),
                        (IDS + 1000, "vocabulary"), (torch.zeros(0, 4, dtype=torch.long), "non-empty")]:
        with pytest.raises(DataError, match=phrase):
            prune_and_repair(copy.deepcopy(model), plan, ApplyConfig(repair="scale"), bad)
    other = half_plan(build("mixtral"))
    untouched = copy.deepcopy(model)
    with pytest.raises(PlanError):
        prune_and_repair(untouched, other, ApplyConfig(repair="scale"), IDS)
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), model.state_dict().values()))
    quantised = copy.deepcopy(model)
    quantised.config.quantization_config = {"quant_method": "fp8"}
    with pytest.raises(ArchitectureError, match="quantised"):
        prune_and_repair(quantised, plan, ApplyConfig(repair="lstsq"), IDS)


# -- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("repair"))


def test_grape_apply_repairs_in_memory_and_refuses_what_it_cannot(ws, tmp_path, capsys):
    model = T.AutoModelForCausalLM.from_pretrained(ws.model)
    half_plan(model).save(tmp_path / "plan.json")
    base = ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json")]
    data = ["--repair-data", str(ws.calibration), "--repair-samples", "4", "--repair-seq-len", "32"]

    assert grape_main([*base, "--out", str(tmp_path / "r"), "--repair", "lstsq", *data]) == 0
    out = capsys.readouterr().out
    assert "repair lstsq: 3 layer(s) on 128 tokens" in out and "streamed" not in out
    provenance = json.loads((tmp_path / "r" / "grape_provenance.json").read_text())
    assert provenance["repair"]["method"] == "lstsq" and provenance["repair"]["rows"] == 4
    assert provenance["repair"]["relative_error_after"] < provenance["repair"]["relative_error_before"]
    assert grape_main([*base, "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    fixed, removed = load_pruned(tmp_path / "r"), load_pruned(tmp_path / "p")
    assert {n: t.shape for n, t in fixed.state_dict().items()} == {n: t.shape for n, t in removed.state_dict().items()}
    capsys.readouterr()

    for argv, phrase in [
        (["--repair", "scale"], "pass --repair-data PATH"),
        (["--repair", "scale", "--repair-data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--repair", "scale", *data, "--method", "mask"], "does not combine with --method mask"),
        (["--repair", "scale", "--repair-data", str(ws.calibration), "--repair-samples", "10000"],
         "--repair-samples"),
    ]:
        assert grape_main([*base, "--out", str(tmp_path / "x"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert phrase in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_grape_run_repairs_its_plan_and_its_baselines_on_the_calibration_text(ws, tmp_path, capsys):
    from cli_workspace import RUN_FLAGS

    out = tmp_path / "run"
    argv = ["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data", *map(str, ws.heldout),
            "--out", str(out), "--budget", "0.5", "--no-search", "--no-compare", "--no-save", *RUN_FLAGS,
            "--repair", "lstsq", "--repair-samples", "4", "--repair-seq-len", "32"]
    assert grape_main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("repair lstsq:") == 2  # the applied plan and the uniform baseline
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["nll"]) == {"unpruned", "exact", "uniform"}


def test_grape_run_writes_its_repaired_checkpoint_layer_by_layer_when_it_streams(ws, tmp_path, capsys):
    """--apply-mode streaming: the checkpoint is pruned and repaired from the shards
    (grape.pruning.repair_sequential), the same tensors as grape apply's in-memory repair of that plan
    on the same text; no longer refused."""
    from cli_workspace import RUN_FLAGS

    out = tmp_path / "run"
    argv = ["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data", *map(str, ws.heldout),
            "--out", str(out), "--budget", "0.5", "--no-search", "--no-compare", "--baselines", "none", *RUN_FLAGS,
            "--repair", "lstsq", "--repair-samples", "4", "--repair-seq-len", "32", "--apply-mode", "streaming"]
    assert grape_main(argv) == 0
    printed = capsys.readouterr().out
    assert "streamed shard by shard, repair lstsq: 3 layer(s) on 128 tokens" in printed
    record = json.loads((out / "checkpoint" / "grape_provenance.json").read_text())
    assert record["apply_mode"] == "streaming" and record["repair"]["layer_sequential"] is True
    assert grape_main(["apply", "--model", str(ws.model), "--plan", str(out / "plan.json"), "--out",
                       str(tmp_path / "m"), "--mode", "in-memory", "--repair", "lstsq", "--repair-data",
                       str(ws.calibration), "--repair-samples", "4", "--repair-seq-len", "32"]) == 0
    got, expected = load_pruned(out / "checkpoint").state_dict(), load_pruned(tmp_path / "m").state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[n], expected[n]) for n in got)
