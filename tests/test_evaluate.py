"""Evaluation: held-out NLL per domain, local lm-eval tasks, lm-eval in-process, `grape eval`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from grape.errors import DataError
from grape.evaluation.perplexity import (
    EvalConfig,
    EvalResult,
    evaluate,
    load_documents,
    pack_windows,
    token_stream,
    window_losses,
    window_nll,
)
from grape.evaluation.lmeval_tasks import LOCAL_TAG, build_local_tasks, run_lm_eval
from solvers.errors import UserError
from tests.tiny_models import make_tiny, make_tiny_tokenizer

PROSE = [
    ("The river ran past the old mill.\nChildren played on its banks every summer.\n"
     "In winter the water froze and the mill fell silent.\nOnly the crows stayed."),
    ("A lighthouse keeper wrote letters to nobody.\nEach night he lit the lamp again.\n"
     "Ships passed far away and never answered.\nHe kept writing all the same."),
    ("The market opened before sunrise.\nFarmers carried baskets of apples and pears.\n"
     "Bakers sold warm bread to the early crowd.\nBy noon the square was empty again."),
]
CODE = [
    "def add(a, b):\n    total = a + b\n    return total\n\nprint(add(1, 2))",
    ("class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
     "    def step(self):\n        self.count += 1\n        return self.count"),
    ("import os\n\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n"
     "        print(name)\n    else:\n        continue"),
]
DOCS = {"prose": PROSE, "code": CODE}


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE trained on the test documents, wrapped like the zoo's."""
    return make_tiny_tokenizer(PROSE + CODE, vocab_size=400)


def tiny(family: str, tokenizer, **overrides):
    return make_tiny(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     **overrides)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny("qwen3_moe", tokenizer)


def quiet(**kw) -> EvalConfig:
    return EvalConfig(progress=False, **kw)


def reference_stream(tokenizer, texts):
    eos = tokenizer.eos_token_id
    stream = [eos]
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [eos]
    return stream


def reference_nll(model, stream, seq_len):
    """Independent reference: the stream cut into windows of seq_len inputs overlapping by one
    token, each run alone, log-softmax picked by hand in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, seq_len):
            inputs = torch.tensor(stream[start:start + seq_len])[None]
            targets = torch.tensor(stream[start + 1:start + seq_len + 1])
            inputs = inputs[:, :len(targets)]
            logp = torch.log_softmax(model(inputs).logits[0].double(), dim=-1)
            total -= logp[torch.arange(len(targets)), targets].sum().item()
            count += len(targets)
    return total / count, count


# -- perplexity ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_nll_equals_hand_computed_cross_entropy(tokenizer, family):
    model = tiny(family, tokenizer)
    # batch 3 with padding in the last batch; gpt_oss has a 16-token sliding window
    result = evaluate(model, tokenizer, DOCS,
                      quiet(seq_len=24, batch_size=3, max_tokens_per_domain=None))
    for domain, texts in DOCS.items():
        nll, count = reference_nll(model, reference_stream(tokenizer, texts), 24)
        got = result.domains[domain]
        assert got.tokens == count
        assert got.documents == len(texts)
        assert got.nll == pytest.approx(nll, abs=1e-5)
        assert got.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_overall_means_are_macro_and_token_weighted(tokenizer, model):
    r = evaluate(model, tokenizer, DOCS, quiet(seq_len=16, max_tokens_per_domain=None))
    p, c = r.domains["prose"], r.domains["code"]
    assert r.mean_nll == pytest.approx((p.nll + c.nll) / 2)
    assert r.weighted_nll == pytest.approx((p.nll * p.tokens + c.nll * c.tokens)
                                           / (p.tokens + c.tokens))
    assert r.tokens == p.tokens + c.tokens


def test_token_cap_takes_first_documents(tokenizer, model):
    r = evaluate(model, tokenizer, DOCS, quiet(seq_len=8, max_tokens_per_domain=20))
    first_doc = len(tokenizer.encode(PROSE[0], add_special_tokens=False))
    assert r.domains["prose"].tokens == 20
    assert r.domains["prose"].windows == 3  # 8 + 8 + 4 predicted tokens
    assert r.domains["prose"].documents == (1 if first_doc + 2 >= 21 else 2)
    nll, count = reference_nll(model, reference_stream(tokenizer, PROSE)[:21], 8)
    assert count == 20 and r.domains["prose"].nll == pytest.approx(nll, abs=1e-5)


def test_domains_are_scored_independently(tokenizer, model):
    both = evaluate(model, tokenizer, DOCS, quiet(seq_len=16))
    alone = evaluate(model, tokenizer, {"code": CODE}, quiet(seq_len=16))
    assert list(both.domains) == ["prose", "code"]
    assert list(alone.domains) == ["code"]
    assert alone.domains["code"].nll == pytest.approx(both.domains["code"].nll, abs=1e-6)
    assert both.domains["prose"].nll != pytest.approx(both.domains["code"].nll, abs=1e-3)


def test_evaluation_is_deterministic_and_batch_independent(tokenizer, model):
    config = quiet(seq_len=16, batch_size=2)
    a = evaluate(model, tokenizer, DOCS, config).to_dict()
    b = evaluate(model, tokenizer, DOCS, config).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    one = evaluate(model, tokenizer, DOCS, quiet(seq_len=16, batch_size=1))
    for domain, row in a["perplexity"]["domains"].items():
        assert one.domains[domain].nll == pytest.approx(row["nll"], abs=1e-5)


def test_window_losses_are_per_window_and_padding_free(tokenizer, model):
    stream, _ = token_stream(tokenizer, PROSE + CODE, None)
    windows = pack_windows(stream, 16)[:3]
    windows[-1] = windows[-1][:7]  # a short window gets right-padded in the batch
    losses, counts = window_losses(model, windows, tokenizer.pad_token_id, torch.device("cpu"))
    assert counts == [len(w) - 1 for w in windows]
    for window, loss in zip(windows, losses):  # each alone, unpadded: the same sum
        alone, n = window_nll(model, [window], tokenizer.pad_token_id, torch.device("cpu"))
        assert n == len(window) - 1
        assert loss == pytest.approx(alone, rel=1e-5)
    total, n = window_nll(model, windows, tokenizer.pad_token_id, torch.device("cpu"))
    assert (total, n) == (pytest.approx(sum(losses)), sum(counts))


@settings(deadline=None, derandomize=True, max_examples=60)
@given(n=st.integers(0, 70), seq_len=st.integers(2, 17))
def test_windows_predict_every_token_after_the_first_once(n, seq_len):
    stream = list(range(n))
    windows = pack_windows(stream, seq_len)
    predicted = [t for w in windows for t in w[1:]]
    assert predicted == stream[1:]
    assert all(2 <= len(w) <= seq_len + 1 for w in windows)


def test_token_stream_joins_documents_with_eos(tokenizer):
    stream, used = token_stream(tokenizer, ["ab", "cd"], max_tokens=None)
    eos = tokenizer.eos_token_id
    assert stream[0] == eos and stream[-1] == eos and used == 2
    assert stream.count(eos) == 3


# -- data loading and results ----------------------------------------------------------------


def test_load_documents_groups_by_domain(tmp_path):
    mixed = tmp_path / "mixed.test.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in [
        {"text": "p1", "domain": "prose"}, {"text": "c1", "domain": "c"},
        {"text": "   "}, {"text": "p2", "domain": "prose", "source": "x"}]) + "\n")
    nodomain = tmp_path / "python.test.jsonl"
    nodomain.write_text(json.dumps({"text": "py1"}) + "\n")
    plain = tmp_path / "notes.txt"
    plain.write_text("free text\n")
    docs = load_documents([mixed, nodomain, plain, f"c={plain}"])
    assert docs == {"prose": ["p1", "p2"], "c": ["c1", "free text\n"], "python": ["py1"],
                    "notes": ["free text\n"]}
    assert load_documents(tmp_path) == {"prose": ["p1", "p2"], "c": ["c1"],
                                        "notes": ["free text\n"], "python": ["py1"]}
    assert load_documents({"a": ["x", ""], "b": [""]}) == {"a": ["x"]}
    # raw U+2028 inside a JSON string (ensure_ascii=False) is not a line break of the file
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_documents(odd) == {"odd": ["a\u2028b"]}


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ('{"text": "ok"}\n{broken\n', "bad.jsonl:2 is not valid JSON"),
    ('{"body": "no text"}\n', "bad.jsonl:1 has no 'text' field"),
    ("\n\n", "no non-empty documents"),
])
def test_bad_data_raises_data_error(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=needle) as info:
        load_documents([path])
    assert isinstance(info.value, UserError)
    if content is None:
        assert str(path) in str(info.value)


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="seq_len"):
        EvalConfig(seq_len=1)
    with pytest.raises(UserError, match="nothing to evaluate"):
        EvalConfig(perplexity=False)


def test_seq_len_beyond_model_positions_is_capped_with_a_notice(tokenizer, model, capsys):
    """The one policy of every stage (grape.models.files.cap_seq_len): capped, with a notice."""
    limit = model.config.max_position_embeddings
    result = evaluate(model, tokenizer, DOCS, quiet(seq_len=limit + 1))
    assert result.config.seq_len == limit
    assert "longer than the model's context" in capsys.readouterr().out


def test_result_round_trips_and_reports_nll_increase(tokenizer, model, tmp_path):
    r = evaluate(model, tokenizer, DOCS, quiet(seq_len=16), name="pruned")
    base = EvalResult.from_dict(json.loads(r.to_json()))
    base.model = "unpruned"
    base.domains = {d: type(v)(d, v.nll - 0.5, v.tokens, v.windows, v.documents)
                    for d, v in base.domains.items()}
    increase = r.nll_increase(base)
    assert increase["prose"] == pytest.approx(0.5) and increase["mean"] == pytest.approx(0.5)
    path = tmp_path / "eval.json"
    path.write_text(r.to_json(base))
    back = EvalResult.from_json(path)
    assert back.domains == r.domains and back.config == r.config
    assert json.loads(path.read_text())["perplexity"]["nll_increase"]["code"] == \
        pytest.approx(0.5)
    md = r.to_markdown(base)
    assert "| prose |" in md and "+0.5000" in md and "`unpruned`" in md
    with pytest.raises(DataError, match="not a grape eval result"):
        EvalResult.from_dict({"model": "x"})


# -- local lm-eval tasks ---------------------------------------------------------------------


def test_local_tasks_are_valid_jsonl_and_yaml_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = build_local_tasks(DOCS, "tasks", n_per_domain=5, seed=3)
    assert names == [f"grape_{kind}_{domain}" for kind in ("scramble", "nextline", "cloze")
                     for domain in DOCS]
    for name in names:
        config = yaml.safe_load((tmp_path / "tasks" / f"{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert os.path.isabs(data_file) and os.path.samefile(data_file,
                                                             tmp_path / "tasks" / f"{name}.jsonl")
        assert config["task"] == name and LOCAL_TAG in config["tag"]
        assert config["output_type"] == "multiple_choice"
        rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
        assert 1 <= len(rows) <= 5
        domain = config["metadata"]["domain"]
        for row in rows:
            assert len(row["choices"]) == 4 and 0 <= row["label"] < 4
            assert len({c.strip() for c in row["choices"]}) == 4
            true = row["choices"][row["label"]]
            # context + delimiter + true choice is a piece of a document of the domain
            source = [d for d in DOCS[domain] if row["context"] + config["target_delimiter"]
                      + true in d]
            assert source
            kind = config["metadata"]["kind"]
            for other in row["choices"]:
                if other == true:
                    continue
                if kind == "nextline":  # distractors: lines of other documents
                    assert other not in source[0]
                    assert any(other in d for d in DOCS[domain] if d not in source)
                if kind == "scramble":  # distractors: the same words, two of them swapped
                    assert sorted(other.split()) == sorted(true.split())
                    assert sum(a != b for a, b in zip(other.split(), true.split())) == 2


def test_local_tasks_are_deterministic_per_seed(tmp_path):
    def files(out, seed):
        build_local_tasks(DOCS, out, n_per_domain=6, seed=seed)
        return {p.name: p.read_text() for p in sorted(out.glob("*.jsonl"))}

    first = files(tmp_path / "a", 0)
    assert files(tmp_path / "b", 0) == first
    assert files(tmp_path / "c", 1) != first


def test_local_tasks_need_two_documents(tmp_path):
    with pytest.raises(DataError, match="at least 2 documents"):
        build_local_tasks({"solo": [PROSE[0]]}, tmp_path, n_per_domain=3)


def test_lm_eval_runs_local_and_user_tasks_in_process(tokenizer, model, tmp_path):
    task_dir = tmp_path / "local"
    names = build_local_tasks(DOCS, task_dir, n_per_domain=4, seed=0, kinds=("nextline",))
    # a "user" task: its own directory and name, passed through by name
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    config = yaml.safe_load((task_dir / f"{names[0]}.yaml").read_text())
    config.update(task="my_next_line", tag=[])
    (user_dir / "my_next_line.yaml").write_text(yaml.safe_dump(config))

    scores = run_lm_eval(model, tokenizer, names + ["my_next_line"], [task_dir, user_dir],
                         batch_size=4)
    assert set(scores) == {*names, "my_next_line"}
    for score in scores.values():
        assert 0.0 <= score.acc <= 1.0 and 0.0 <= score.acc_norm <= 1.0
        assert score.samples == 4
    # same data, same model: the pass-through task scores exactly like the local one
    assert scores["my_next_line"].metrics == scores[names[0]].metrics


def test_evaluate_with_local_tasks(tokenizer, model, tmp_path):
    config = quiet(seq_len=16, tasks=("local",), local_task_kinds=("cloze",),
                   local_task_examples=3, local_task_dir=str(tmp_path / "t"))
    r = evaluate(model, tokenizer, DOCS, config)
    assert set(r.tasks) == {"grape_cloze_prose", "grape_cloze_code"}
    assert "## lm-eval tasks" in r.to_markdown() and set(r.domains) == set(DOCS)


@pytest.mark.slow
def test_unknown_lm_eval_task_is_a_data_error(tokenizer, model, tmp_path):
    with pytest.raises(DataError, match="no_such_task_xyz"):
        run_lm_eval(model, tokenizer, ["no_such_task_xyz"], [tmp_path])


# -- command line ----------------------------------------------------------------------------


def test_grape_eval_command_writes_results(tokenizer, model, tmp_path, capsys):
    from grape.cli.main import main

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n"
                            for d, texts in DOCS.items() for t in texts))
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), "--data", str(data), "--seq-len", "16",
            "--max-tokens", "40", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["perplexity"]["domains"]) == {"prose", "code"}
    assert result["perplexity"]["domains"]["prose"]["tokens"] == 40
    assert "| prose |" in (out / "eval.md").read_text()
    assert json.loads((out / "eval_config.json").read_text())["eval"]["seq_len"] == 16
    # same checkpoint, in memory: same numbers
    direct = evaluate(model, tokenizer, DOCS, quiet(seq_len=16, max_tokens_per_domain=40))
    assert result["perplexity"]["domains"]["code"]["nll"] == \
        pytest.approx(direct.domains["code"].nll, abs=1e-5)

    # against itself as the baseline: zero increase
    assert main(argv[:-2] + ["--baseline", str(out / "eval.json"), "--out", str(tmp_path / "o2")
                             ]) == 0
    again = json.loads((tmp_path / "o2" / "eval.json").read_text())
    assert again["perplexity"]["nll_increase"]["mean"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("flag, needle", [("--model", "model directory"),
                                          ("--data", "evaluation data file")])
def test_grape_eval_bad_path_exits_2_with_one_line(tmp_path, capsys, flag, needle):
    from grape.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world", "domain": "x"}) + "\n")
    (tmp_path / "model").mkdir()
    # a model that passes the cheap checks (config.json names a type transformers has)
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    args = {"--model": str(tmp_path / "model"), "--data": str(data)}
    args[flag] = str(tmp_path / "missing")
    argv = ["eval", "--out", str(tmp_path / "out")] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "missing" in err and "Traceback" not in err


def test_grape_eval_loads_a_non_uniform_pruned_checkpoint(tokenizer, tmp_path):
    checkpoint = pytest.importorskip("grape.pruning.checkpoint")
    from grape.pruning.apply import apply_plan
    from grape.cli.main import main
    from solvers.plan import Plan

    pruned = tiny("qwen3_moe", tokenizer)
    plan = Plan(kept={0: [0, 1, 2, 3, 4, 5], 1: [0, 2, 5], 2: list(range(8))},
                removed={0: [6, 7], 1: [1, 3, 4, 6, 7], 2: []})
    apply_plan(pruned, plan)
    checkpoint.save_pruned(pruned, tmp_path / "pruned", plan=plan, tokenizer=tokenizer)
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    argv = ["eval", "--model", str(tmp_path / "pruned"), "--data", str(data), "--seq-len", "16",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    got = json.loads((tmp_path / "out" / "eval.json").read_text())["perplexity"]["domains"]
    direct = evaluate(pruned, tokenizer, {"code": CODE}, quiet(seq_len=16))
    assert got["code"]["nll"] == pytest.approx(direct.domains["code"].nll, abs=1e-5)


def test_the_eval_flags_are_generated_from_the_config():
    """Every flagged EvalConfig field is a `grape eval` flag, and the flags build it back."""
    from grape.cli.main import build_parser
    from grape.cli.commands.eval import config_from_args
    from grape.evaluation.perplexity import EvalConfig

    parser = build_parser().verb_parsers["eval"]
    args = parser.parse_args(["--model", "m", "--out", "o"])
    assert config_from_args(args) == EvalConfig()
    args = parser.parse_args(["--model", "m", "--out", "o", "--max-tokens", "0", "--tasks", "local,x",
                              "--task-path", "a", "b", "--task-kinds", "cloze", "--no-perplexity",
                              "--seq-len", "64", "--verbose"])
    assert config_from_args(args) == EvalConfig(
        max_tokens_per_domain=None, tasks=("local", "x"), task_paths=("a", "b"),
        local_task_kinds=("cloze",), perplexity=False, seq_len=64, verbose=True)
