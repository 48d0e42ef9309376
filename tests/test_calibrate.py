"""Calibration: observer statistics equal a slow per-token reference, logits are untouched, the
scores file carries the model identity, similarity and cost curves are sound, for every family."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grape.models.adapters import get_adapter
from grape.calibration.calibrate import (
    CalibrationConfig,
    all_expert_outputs,
    calibrate,
    linear_cka,
    mean_output_cosine,
    position_ids_from_mask,
)
from grape.errors import ArchitectureError, DataError
from grape.calibration.observer import OBSERVER_IMPLEMENTATION, ExpertObserver
from solvers.errors import ScoresError
from solvers.scores import STAT_NAMES, Scores
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids

QUICK = dict(batch_size=2, subsample=24, progress=False)


def _adapter(model):
    try:
        return get_adapter(model)
    except ArchitectureError as exc:  # a family whose adapter is not written yet
        pytest.skip(f"no adapter yet: {exc}")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def block_io(model, adapter, ids):
    """Each MoE block's 2-D inputs and outputs during a plain forward of `ids`."""
    inputs, outputs, handles = {}, {}, []
    for layer, block in adapter.moe_blocks().items():

        def pre(module, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            inputs.setdefault(layer, []).append(x.detach().reshape(-1, x.shape[-1]).clone())

        def post(module, args, output, layer=layer):
            y = _first(output)
            outputs.setdefault(layer, []).append(y.detach().reshape(-1, y.shape[-1]).clone())

        handles += [
            block.register_forward_pre_hook(pre, with_kwargs=True),
            block.register_forward_hook(post),
        ]
    try:
        with torch.no_grad():
            for batch in ids.split(2):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}, {
        k: torch.cat(v) for k, v in outputs.items()
    }


def reference_stats(adapter, layer, hidden):
    """The statistics token by token: call the router, then each chosen expert, directly."""
    n = adapter.num_experts(layer)
    ref = {name: np.zeros(n) for name in STAT_NAMES}
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            x = hidden[t : t + 1]
            index, weights = adapter.route(layer, x)
            for e, g in zip(index[0].tolist(), weights[0].double().tolist()):
                norm = adapter.expert_forward(layer, x, e)[0].double().norm().item()
                ref["count"][e] += 1
                ref["gate_sum"][e] += g
                ref["norm_sum"][e] += norm
                ref["gate_norm_sum"][e] += g * norm
                ref["gate_norm_sq_sum"][e] += (g * norm) ** 2
                ref["norm_max"][e] = max(ref["norm_max"][e], norm)
    return ref


def observe(model, adapter, ids, **kwargs):
    with torch.no_grad(), ExpertObserver(model, adapter, **kwargs) as observer:
        logits = torch.cat([model(batch).logits for batch in ids.split(2)])
    return logits, observer.results()


# -- the observer ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_per_token_reference(family):
    model = make_tiny(family)
    adapter = _adapter(model)
    ids = tiny_input_ids(4, 12)
    inputs, outputs = block_io(model, adapter, ids)
    _, observed = observe(model, adapter, ids)
    assert sorted(observed) == sorted(adapter.moe_blocks())
    for layer, obs in observed.items():
        ref = reference_stats(adapter, layer, inputs[layer])
        assert obs.stats["count"].sum() == ids.numel() * adapter.top_k(layer)
        for name in STAT_NAMES:
            np.testing.assert_allclose(
                obs.stats[name], ref[name], rtol=1e-5, atol=1e-6, err_msg=name
            )
        energy = outputs[layer].double().square().sum(dim=1).mean().item()
        assert obs.tokens == ids.numel()
        assert obs.output_energy == pytest.approx(energy, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_observer_leaves_logits_and_implementation_unchanged(family):
    model = make_tiny(family)
    adapter = _adapter(model)
    ids = tiny_input_ids(4, 12)
    before = model.get_experts_implementation()
    with torch.no_grad():
        plain = torch.cat([model(batch).logits for batch in ids.split(2)])
    observed, _ = observe(model, adapter, ids)
    assert torch.equal(observed, plain)  # bit-identical with the default backend
    assert model.get_experts_implementation() == before
    with torch.no_grad():
        assert torch.equal(torch.cat([model(batch).logits for batch in ids.split(2)]), plain)
    assert not any(
        hasattr(adapter.experts(layer), "_grape_observer_state") for layer in adapter.moe_blocks()
    )


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_generic_path_equals_the_grouped_mm_fast_path(family, monkeypatch):
    """Without the grouped_mm fast path the observer calls the backend on the routed pairs
    (T*k rows, k=1): same logits bit for bit, same statistics."""
    import grape.calibration.observer

    model = make_tiny(family)
    adapter = _adapter(model)
    ids = tiny_input_ids(4, 12)
    fast_logits, fast = observe(model, adapter, ids)
    monkeypatch.setattr(grape.calibration.observer, "_grouped_linear", None)
    generic_logits, generic = observe(model, adapter, ids)
    assert torch.equal(generic_logits, fast_logits)
    for layer in fast:
        for name in STAT_NAMES:
            np.testing.assert_allclose(
                generic[layer].stats[name], fast[layer].stats[name], rtol=1e-6
            )


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_observer_wraps_whichever_backend_the_model_uses(family):
    """With the eager backend the outputs and the statistics are the same as with grouped_mm."""
    model = make_tiny(family)
    adapter = _adapter(model)
    ids = tiny_input_ids(2, 12)
    with torch.no_grad():
        plain = model(ids).logits
    _, grouped = observe(model, adapter, ids)
    model.set_experts_implementation("eager")
    eager_logits, eager = observe(model, adapter, ids)
    assert model.get_experts_implementation()[""] == "eager"
    torch.testing.assert_close(eager_logits, plain, rtol=1e-5, atol=1e-5)
    for layer in grouped:
        for name in STAT_NAMES:
            np.testing.assert_allclose(
                eager[layer].stats[name], grouped[layer].stats[name], rtol=1e-5
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"])
def test_half_precision_statistics_and_logits(family, dtype):
    model = make_tiny(family).to(dtype)
    adapter = _adapter(model)
    ids = tiny_input_ids(4, 12)
    with torch.no_grad():
        plain = torch.cat([model(b).logits for b in ids.split(2)])
    inputs, _ = block_io(model, adapter, ids)
    logits, observed = observe(model, adapter, ids)
    assert torch.equal(logits, plain)
    for layer, obs in observed.items():
        assert all(v.dtype == np.float64 for v in obs.stats.values())
        ref = reference_stats(adapter, layer, inputs[layer])
        # half-precision routing of one row vs a batch can flip near-ties: compare totals and
        # most experts
        assert obs.stats["count"].sum() == ref["count"].sum()
        for name in ("gate_sum", "gate_norm_sum", "norm_sum"):
            assert obs.stats[name].sum() == pytest.approx(ref[name].sum(), rel=3e-2)
        close = np.isclose(obs.stats["gate_norm_sum"], ref["gate_norm_sum"], rtol=5e-2, atol=1e-2)
        assert close.mean() >= 0.75


def test_observer_samples_same_positions_in_every_layer():
    model = make_tiny("qwen3_moe")
    adapter = _adapter(model)
    ids = tiny_input_ids(4, 12)
    inputs, _ = block_io(model, adapter, ids)
    _, observed = observe(model, adapter, ids, sample_tokens=10, sample_per_call=5, seed=3)
    rows = {}
    for layer, obs in observed.items():
        assert obs.samples.shape == (10, model.config.hidden_size)
        # every sampled row is one of the block's real input rows; record which
        match = (obs.samples[:, None, :] == inputs[layer][None]).all(-1)
        assert match.any(1).all()
        rows[layer] = match.float().argmax(1).tolist()
    assert len({tuple(r) for r in rows.values()}) == 1


def test_observer_misuse_is_reported():
    model = make_tiny("qwen3_moe")
    adapter = _adapter(model)
    with ExpertObserver(model, adapter) as observer:
        with pytest.raises(ArchitectureError, match="already being observed"):
            ExpertObserver(model, adapter).__enter__()
        with pytest.raises(ArchitectureError, match="saw no tokens"):
            observer.results()
        with torch.no_grad():  # the failed nested observer left the first one intact
            model(tiny_input_ids(1, 8))
        assert observer.results()[min(adapter.moe_blocks())].tokens == 8
    # left switched to the observer implementation without an observer: still the model's math
    ids = tiny_input_ids(2, 12)
    with torch.no_grad():
        plain = model(ids).logits
        model.set_experts_implementation(OBSERVER_IMPLEMENTATION)
        torch.testing.assert_close(model(ids).logits, plain, rtol=1e-5, atol=1e-5)


# -- calibrate: scores file, identity, similarity, cost curves ------------------------------
@pytest.fixture(scope="module")
def qwen_scores():
    model = make_tiny("qwen3_moe")
    return model, calibrate(model, tiny_input_ids(6, 16), CalibrationConfig(**QUICK))


def test_scores_file_round_trip_and_identity(qwen_scores, tmp_path):
    model, scores = qwen_scores
    adapter = get_adapter(model)
    assert scores.model == adapter.identity() and scores.model.fingerprint
    assert scores.tokens == 6 * 16
    assert (
        scores.calibration["criterion"] == "reap_mass" and scores.calibration["normalize"] == "none"
    )
    assert scores.calibration["subsample_tokens"] == {
        str(layer): 24 for layer in adapter.moe_blocks()
    }
    # the reconstruction order runs on more rows: here every one of the 96 tokens
    assert scores.calibration["reconstruction_tokens"] == {str(layer): 96 for layer in adapter.moe_blocks()}
    scores.save(tmp_path / "scores.npz")
    loaded = Scores.load(tmp_path / "scores.npz")
    assert loaded.model == scores.model and loaded.fingerprint() == scores.fingerprint()
    for layer, ls in scores.layers.items():
        other = loaded.layers[layer]
        for name in STAT_NAMES:
            np.testing.assert_array_equal(other.stats[name], ls.stats[name])
        assert sorted(other.similarity) == ["cka", "cosine", "router"]
        for kind, sim in ls.similarity.items():
            np.testing.assert_array_equal(other.similarity[kind], sim)
        np.testing.assert_array_equal(other.cost_curve, ls.cost_curve)
        np.testing.assert_array_equal(other.expert_bytes, adapter.expert_bytes(layer))
        assert other.output_energy == ls.output_energy > 0
    loaded.model.check_matches(adapter.identity())  # same model: accepted


@pytest.mark.parametrize("other", [dict(family="qwen3_moe", seed=1), dict(family="olmoe", seed=0)])
def test_scores_from_another_model_are_rejected(qwen_scores, other):
    _, scores = qwen_scores
    model = make_tiny(other["family"], seed=other["seed"])
    with pytest.raises(ScoresError, match="different model.*grape calibrate"):
        scores.model.check_matches(get_adapter(model).identity())


@pytest.mark.parametrize("family", FAMILIES)
def test_similarity_matrices_are_valid(family):
    model = make_tiny(family)
    _adapter(model)
    scores = calibrate(model, tiny_input_ids(4, 16), CalibrationConfig(**QUICK, cost_curves=False))
    for layer in scores.layers.values():
        assert layer.cost_curve is None
        for kind, sim in layer.similarity.items():
            n = layer.num_experts
            assert sim.shape == (n, n) and np.all(np.isfinite(sim)), kind
            np.testing.assert_array_equal(sim, sim.T)
            np.testing.assert_array_equal(np.diag(sim), 1.0)
            low = 0.0 if kind == "cka" else -1.0
            assert sim.min() >= low and sim.max() <= 1.0
            assert np.ptp(sim[~np.eye(n, dtype=bool)]) > 0  # experts are told apart


def test_router_similarity_is_the_weight_cosine(qwen_scores):
    model, scores = qwen_scores
    adapter = get_adapter(model)
    for layer, ls in scores.layers.items():
        w = adapter.router(layer).weight.detach().double()
        w = w / w.norm(dim=1, keepdim=True)
        expected = (w @ w.T).numpy()
        np.fill_diagonal(expected, 1.0)
        np.testing.assert_allclose(ls.similarity["router"], expected, atol=1e-12)


def test_cka_and_cosine_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 30, 7, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(7, 7, generator=g))
    outputs[1] = 3.0 * outputs[0] @ rotation + 2.0  # same representation: scaled, rotated, shifted
    cka = linear_cka(outputs)

    def direct(x, y):  # feature-space form: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
        x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
        return ((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())).item()

    for i in range(5):
        for j in range(5):
            assert cka[i, j] == pytest.approx(
                1.0 if i == j else direct(outputs[i], outputs[j]), abs=1e-6
            )
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-6)
    means = outputs.double().mean(1)
    cos = mean_output_cosine(outputs)
    assert cos[2, 3] == pytest.approx(
        torch.nn.functional.cosine_similarity(means[2], means[3], dim=0).item()
    )


@settings(deadline=None, derandomize=True, max_examples=25)
@given(
    experts=st.integers(2, 6),
    tokens=st.integers(2, 12),
    hidden=st.integers(1, 5),
    zero=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_similarity_invariants(experts, tokens, hidden, zero, seed):
    outputs = torch.randn(experts, tokens, hidden, generator=torch.Generator().manual_seed(seed))
    if zero:
        outputs[0] = 0.0  # an expert that always outputs 0: similar to nothing, still finite
    for sim in (linear_cka(outputs), mean_output_cosine(outputs)):
        assert np.all(np.isfinite(sim)) and np.array_equal(sim, sim.T)
        assert np.array_equal(np.diag(sim), np.ones(experts))
        if zero:
            assert np.all(sim[0, 1:] == 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cost_curve_equals_masked_block_error(family):
    """cost_curve[n] is the block-output error of the model with the n-th order masked, measured
    independently: adapter.mask_experts on a copy, then the real MoE block forward."""
    overrides = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    model = make_tiny(family, **overrides)
    adapter = _adapter(model)
    config = CalibrationConfig(**QUICK)
    scores = calibrate(model, tiny_input_ids(6, 16), config)
    importance = scores.importance(config.criterion)
    for layer, ls in scores.layers.items():
        n, k = ls.num_experts, adapter.top_k(layer)
        curve = ls.cost_curve
        assert curve.shape == (n + 1,) and np.all(np.isfinite(curve)) and np.all(curve >= 0)
        assert curve[n] == 0.0
        # monotone-ish: keeping more experts costs less, on the whole
        upper = curve[k:]
        assert np.corrcoef(np.arange(len(upper)), upper)[0, 1] < 0
        assert curve[n - 1] <= curve[k] + 1e-12
        # the independent measurement on the same subsample
        torch.manual_seed(0)
        hidden = _subsample(model, adapter, layer, config)
        with torch.no_grad():
            full = _first(adapter.moe_blocks()[layer](hidden[None])).reshape(hidden.shape).double()
            routed = all_expert_outputs(adapter, layer, hidden)
        index, weights = adapter.route(layer, hidden)
        routed_out = (
            routed[index, torch.arange(hidden.shape[0])[:, None]].double()
            * weights.double()[..., None]
        ).sum(1)
        assert curve[0] == pytest.approx(routed_out.square().sum(1).mean().item(), rel=1e-6)
        order = np.argsort(importance[layer], kind="stable")
        checked = 0
        for kept in range(max(k, 1), n):
            keep = sorted(int(e) for e in order[n - kept :])
            try:
                adapter.check_kept({layer: keep})
            except ArchitectureError:
                continue  # a set the family cannot route (DeepSeek groups)
            masked = copy.deepcopy(model)
            masked_adapter = get_adapter(masked)
            masked_adapter.mask_experts(layer, [int(e) for e in order[: n - kept]])
            with torch.no_grad():
                out = _first(masked_adapter.moe_blocks()[layer](hidden[None])).reshape(hidden.shape)
            error = (full - out.double()).square().sum(1).mean().item()
            assert curve[kept] == pytest.approx(error, rel=1e-4, abs=1e-9), kept
            checked += 1
        # DeepSeek's order prefixes are rarely group-balanced; route_masked is checked below
        assert checked >= 1 or family == "deepseek_v3"


@pytest.mark.parametrize("family", FAMILIES)
def test_route_masked_matches_mask_experts(family):
    """The masked routing used for cost curves is the routing of adapter.mask_experts."""
    overrides = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    model = make_tiny(family, **overrides)
    adapter = _adapter(model)
    hidden = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = min(adapter.moe_blocks())
    n = adapter.num_experts(layer)
    checked = 0
    for removed in ([1], [1, 6], [0, 2, 5, 7]):
        keep = [e for e in range(n) if e not in removed]
        try:
            adapter.check_kept({layer: keep})
        except ArchitectureError:
            continue
        masked = copy.deepcopy(model)
        get_adapter(masked).mask_experts(layer, removed)
        with torch.no_grad():
            expected = _dense(*get_adapter(masked).route(layer, hidden), n)
            got = _dense(*adapter.route_masked(layer, hidden, removed), n)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        assert torch.all(got[:, removed] == 0)
        checked += 1
    assert checked >= 2


def _dense(index, weights, n):
    out = torch.zeros(index.shape[0], n, dtype=torch.float64)
    return out.scatter_add_(1, index, weights.double())


def _subsample(model, adapter, layer, config, every=False):
    """Re-run the observer as calibrate does to get the same subsample rows: the ones similarity
    and cost curves use, or (every=True) all the rows kept, on which the reconstruction order runs."""
    from grape.calibration.observer import per_call_quota
    from grape.calibration.scoring import shared_rows

    ids = tiny_input_ids(6, 16)
    batches = ids.split(config.batch_size)
    quota = config.sample_quota
    with (
        torch.no_grad(),
        ExpertObserver(
            model,
            adapter,
            sample_tokens=quota,
            sample_per_call=per_call_quota(quota, len(batches)),
            seed=config.seed,
        ) as observer,
    ):
        for batch in batches:
            model(batch)
    rows = observer.results()[layer].samples
    return rows if every else shared_rows(rows, config.subsample)


def test_calibrate_on_an_offloaded_device_map(tmp_path):
    """A model dispatched by accelerate with one layer offloaded to disk (weights on `meta`
    between forwards) calibrates to exactly the same scores."""
    from accelerate import dispatch_model

    ids = tiny_input_ids(4, 16)
    reference = calibrate(make_tiny("qwen3_moe"), ids, CalibrationConfig(**QUICK))
    model = make_tiny("qwen3_moe")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert model.model.layers[2].mlp.experts.gate_up_proj.device.type == "meta"
    scores = calibrate(model, ids, CalibrationConfig(**QUICK))
    assert scores.model == reference.model
    for layer, ls in scores.layers.items():
        for name in STAT_NAMES:
            np.testing.assert_array_equal(ls.stats[name], reference.layers[layer].stats[name])
        np.testing.assert_array_equal(ls.cost_curve, reference.layers[layer].cost_curve)
        for kind in ls.similarity:
            np.testing.assert_array_equal(
                ls.similarity[kind], reference.layers[layer].similarity[kind]
            )


def test_statistics_do_not_depend_on_batching():
    model = make_tiny("mixtral")
    ids = tiny_input_ids(4, 16)
    a = calibrate(
        model,
        ids,
        CalibrationConfig(
            batch_size=1, subsample=0, similarity=("router",), cost_curves=False, progress=False
        ),
    )
    b = calibrate(
        model,
        ids,
        CalibrationConfig(
            batch_size=4, subsample=0, similarity=("router",), cost_curves=False, progress=False
        ),
    )
    for layer in a.layers:
        for name in STAT_NAMES:
            np.testing.assert_allclose(
                a.layers[layer].stats[name], b.layers[layer].stats[name], rtol=1e-6
            )
        assert list(a.layers[layer].similarity) == ["router"]


def test_config_errors_name_the_fix():
    model = make_tiny("qwen3_moe")
    ids = tiny_input_ids(2, 8)
    with pytest.raises(ScoresError, match="unknown criterion 'nope'"):
        calibrate(model, ids, CalibrationConfig(criterion="nope", progress=False))
    with pytest.raises(ScoresError, match="unknown normalisation"):
        calibrate(model, ids, CalibrationConfig(normalize="zscore", progress=False))
    with pytest.raises(ScoresError, match="unknown similarity"):
        calibrate(model, ids, CalibrationConfig(similarity=("mse",), progress=False))
    with pytest.raises(DataError, match="subsample > 0"):
        calibrate(model, ids, CalibrationConfig(subsample=0, progress=False))
    with pytest.raises(DataError, match="2-D integer tensor"):
        calibrate(model, ids.float(), CalibrationConfig(progress=False))


# -- the command ----------------------------------------------------------------------------
def test_grape_calibrate_command(tmp_path, capsys):
    from grape.cli.main import main
    from tests.test_data import _words, char_tokenizer

    model = make_tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(_words(400, i))
    out = tmp_path / "scores.npz"
    argv = [
        "calibrate",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--seq-len",
        "32",
        "--samples",
        "8",
        "--batch-size",
        "4",
        "--subsample",
        "16",
        "--similarity",
        "cka,router",
        "--criterion",
        "frequency",
        "--normalize",
        "layer_sum",
        "--device-map",
        "cpu",
        "--no-progress",
    ]
    assert main(argv) == 0
    scores = Scores.load(out)
    assert scores.tokens == 8 * 32
    assert (
        scores.calibration["normalize"] == "layer_sum"
        and scores.calibration["criterion"] == "frequency"
    )
    assert scores.calibration["seq_len"] == 32 and scores.calibration["sources"] == [str(corpus)]
    assert all(sorted(ls.similarity) == ["cka", "router"] for ls in scores.layers.values())
    scores.model.check_matches(get_adapter(model).identity())
    assert "MoE layers" in capsys.readouterr().out

    # user errors: one line, exit status 2, nothing written
    missing = [
        "calibrate",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "x.npz"),
        "--no-progress",
    ]
    assert main(missing) == 2
    assert "does not exist" in capsys.readouterr().err
    short = (
        argv[:6]
        + [str(tmp_path / "x.npz")]
        + ["--seq-len", "128", "--samples", "400", "--no-progress"]
    )
    assert main(short) == 2
    assert "too little calibration text" in capsys.readouterr().err
    # one policy whichever way the stage is called: capped at the context, with a notice
    too_long = argv[:6] + [str(tmp_path / "x.npz"), "--seq-len", "2048", "--samples", "400",
                           "--no-progress"]
    assert main(too_long) == 2  # 400 sequences of the capped length: more than the text holds
    assert "longer than the model's context" in capsys.readouterr().out
    assert not (tmp_path / "x.npz").exists()



# -- padded batches -------------------------------------------------------------------------
PAD_LENGTHS = (12, 7, 3, 9)  # 31 real tokens in a 4 x 12 batch: 17 padded positions
# a subsample quota above the 48 positions: a padded row taken would show in the count
PADDED = dict(subsample=64, progress=False)


def _sequences(lengths=PAD_LENGTHS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _pad(sequences, side: str, pad_id: int = 0) -> dict:
    """A tokenizer's padded output: input_ids and attention_mask, padded on `side`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    return {"input_ids": ids, "attention_mask": mask}


def _unpadded_reference(model, sequences):
    """Token count and per-layer (stats, output energy) of the real tokens alone: every
    sequence calibrated on its own, the sums added up."""
    runs = [calibrate(model, s[None], CalibrationConfig(batch_size=1, **PADDED)) for s in sequences]
    tokens = sum(run.tokens for run in runs)
    layers = {}
    for layer in runs[0].layers:
        per_run = [run.layers[layer] for run in runs]
        stats = {name: sum(ls.stats[name] for ls in per_run) for name in STAT_NAMES}
        stats["norm_max"] = np.max([ls.stats["norm_max"] for ls in per_run], axis=0)
        energy = sum(ls.output_energy * run.tokens for ls, run in zip(per_run, runs)) / tokens
        layers[layer] = (stats, energy)
    return tokens, layers


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_padded_positions_enter_no_statistic(family, side):
    """A padded batch gives the statistics, output energy and token counts of its real tokens
    alone, and its subsample takes no padded position."""
    model = make_tiny(family)
    sequences = _sequences()
    real = sum(PAD_LENGTHS)
    tokens, reference = _unpadded_reference(model, sequences)
    scores = calibrate(model, _pad(sequences, side), CalibrationConfig(batch_size=4, **PADDED))
    assert scores.tokens == tokens == real
    assert set(scores.calibration["subsample_tokens"].values()) == {real}
    for layer, ls in scores.layers.items():
        stats, energy = reference[layer]
        assert ls.stats["count"].sum() == real * get_adapter(model).top_k(layer)
        for name in STAT_NAMES:
            np.testing.assert_allclose(
                ls.stats[name], stats[name], rtol=1e-5, atol=1e-6, err_msg=name
            )
        assert ls.output_energy == pytest.approx(energy, rel=1e-5)
        assert np.isfinite(ls.cost_curve).all()


def test_padded_subsample_rows_are_real_tokens():
    """Through the observer: every sampled row is a real token's block input (as in the
    unpadded forward), the padded ones are never taken, and the mask is checked per forward."""
    model = make_tiny("deepseek_v3")
    adapter = get_adapter(model)
    sequences = _sequences()
    real_inputs = [block_io(model, adapter, s[None])[0] for s in sequences]
    batch = _pad(sequences, "left")
    with torch.no_grad(), ExpertObserver(model, adapter, sample_tokens=100) as observer:
        observer.set_token_mask(batch["attention_mask"])
        model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]))
        with pytest.raises(ArchitectureError, match="token mask has 48 positions"):
            model(tiny_input_ids(1, 8))
    for layer, obs in observer.results().items():
        assert obs.tokens == sum(PAD_LENGTHS) and obs.samples.shape[0] == sum(PAD_LENGTHS)
        rows = torch.cat([inputs[layer] for inputs in real_inputs])
        distance = torch.cdist(obs.samples.double(), rows.double()).min(dim=1).values
        assert distance.max() < 1e-4


def test_position_ids_follow_the_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_tokenizer_output_is_calibration_data():
    """A real tokenizer's padded BatchEncoding (and plain lists) calibrate as the real tokens;
    an unusable mask is a one-line DataError."""
    from tests.tiny_models import make_tiny_tokenizer

    texts = ["the cat sat on the mat", "a dog", "birds sing in the morning light today"]
    tokenizer = make_tiny_tokenizer(texts * 5, vocab_size=260)
    tokenizer.padding_side = "left"
    model = make_tiny("qwen3_moe", vocab_size=len(tokenizer))
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    real = int(encoded["attention_mask"].sum())
    assert real < encoded["input_ids"].numel()
    config = CalibrationConfig(batch_size=2, subsample=16, progress=False)
    scores = calibrate(model, encoded, config)
    assert scores.tokens == real
    as_lists = calibrate(model, dict(tokenizer(texts, padding=True)), config)
    assert as_lists.tokens == real
    for layer, ls in scores.layers.items():
        np.testing.assert_allclose(as_lists.layers[layer].stats["count"], ls.stats["count"])
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    with pytest.raises(DataError, match="attention_mask has shape"):
        calibrate(model, {"input_ids": ids, "attention_mask": mask[:, 1:]}, config)
    with pytest.raises(DataError, match="marks no real token"):
        calibrate(model, {"input_ids": ids, "attention_mask": torch.zeros_like(mask)}, config)
    with pytest.raises(DataError, match="only 0 .padding. and 1"):
        calibrate(model, {"input_ids": ids, "attention_mask": mask * 2}, config)


# -- resume (whole-model mode) --------------------------------------------------------------
def test_interrupted_whole_model_run_resumes_to_the_same_scores(tmp_path, monkeypatch, capsys):
    """Accumulators saved every 2 batches; a run stopped after its second save, run again with
    the same folder, settings and data, runs only the batches after that save and gives the
    uninterrupted run's scores."""
    import grape.calibration.resume

    model = make_tiny("olmoe")
    ids = tiny_input_ids(10, 12)
    config = CalibrationConfig(batch_size=2, subsample=30, progress=False)
    reference = calibrate(model, ids, config)
    saves, original = [], grape.calibration.resume.CalibrationCheckpoint.save

    class Stop(Exception):
        pass

    def save_then_stop(self, name, obj):
        original(self, name, obj)
        saves.append(obj["done"])
        if len(saves) == 2:
            raise Stop

    monkeypatch.setattr(grape.calibration.resume.CalibrationCheckpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        calibrate(model, ids, config, checkpoint=tmp_path / "partial", checkpoint_every=2)
    assert saves == [2, 4]
    monkeypatch.setattr(grape.calibration.resume.CalibrationCheckpoint, "save", original)
    forwards = []
    handle = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    scores = calibrate(model, ids, config, checkpoint=tmp_path / "partial", checkpoint_every=2)
    handle.remove()
    assert len(forwards) == 1  # batch 5 of 5 only
    assert "resuming from the checkpoint" in capsys.readouterr().out
    for layer, ls in reference.layers.items():
        for name in STAT_NAMES:
            np.testing.assert_array_equal(scores.layers[layer].stats[name], ls.stats[name])
        np.testing.assert_array_equal(scores.layers[layer].cost_curve, ls.cost_curve)
        for kind, sim in ls.similarity.items():
            np.testing.assert_array_equal(scores.layers[layer].similarity[kind], sim)
    assert scores.calibration["subsample_tokens"] == reference.calibration["subsample_tokens"]
    # other data: another run's checkpoint, discarded with a notice
    calibrate(model, ids[:4], config, checkpoint=tmp_path / "partial", checkpoint_every=2)
    assert "holds the checkpoint of another run" in capsys.readouterr().out


def test_a_checkpoint_folder_grape_did_not_write_is_refused(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a checkpoint grape calibrate wrote"):
        calibrate(make_tiny("qwen3_moe"), tiny_input_ids(2, 8),
                  CalibrationConfig(**QUICK), checkpoint=tmp_path / "partial")
    assert (tmp_path / "partial" / "mine.txt").read_text() == "keep me"


def test_the_run_report_is_in_the_scores(tmp_path):
    scores = calibrate(make_tiny("mixtral"), tiny_input_ids(4, 8), CalibrationConfig(**QUICK))
    run = scores.calibration["run"]
    assert run["mode"] == "whole" and run["world_size"] == 1 and run["tokens"] == 32
    assert run["seconds"] > 0 and run["tokens_per_second"] > 0 and run["peak_host_memory"] > 0
    assert run["peak_device_memory"] is None  # CPU
    scores.save(tmp_path / "s.npz")
    assert Scores.load(tmp_path / "s.npz").calibration["run"] == run


def test_the_calibrate_flags_are_generated_from_the_config():
    """Every CalibrationConfig field is a `grape calibrate` flag with the field's default, and
    the parsed flags build the same config back (grape/flags.py)."""
    import dataclasses

    from grape.cli.main import build_parser
    from grape.cli.commands.calibrate import config_from_args

    parser = build_parser().verb_parsers["calibrate"]
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(CalibrationConfig):
        assert f.name in dests or f"no_{f.name}" in dests, f.name
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o.npz"])
    assert config_from_args(args) == CalibrationConfig()
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o.npz", "--similarity", "none",
                              "--no-cost-curves", "--samples", "7", "--seq-len", "64"])
    assert config_from_args(args) == CalibrationConfig(similarity=(), cost_curves=False, samples=7,
                                                       seq_len=64)
