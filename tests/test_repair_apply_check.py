"""`grape apply --repair auto` checks its repair in memory as `grape run` does: documents of the
repair's text are held out of the fit (grape.data.split.split_check), the repaired model's NLL
there is compared with the plan's without repair, and a repair that does not lower it is undone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import grape.pruning.repair_check as repair_check
from cli_workspace import make_workspace
from grape.cli.main import main as grape_main
from grape.data.split import split_check
from grape.errors import ShortTextError
from grape.pruning.apply import AUTO_REPAIR
from test_repair import half_plan


class _Words:
    """Whitespace 'tokenizer': one id per word (its length); eos 0 between documents."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def _docs(tmp_path, count: int, words: int):
    path = tmp_path / "docs.jsonl"
    # document d is `words` words of d + 1 letters: its token id is d + 1
    path.write_text("".join(json.dumps({"text": " ".join(["w" * (d + 1)] * words)}) + "\n"
                            for d in range(count)))
    return [str(path)]


def test_the_check_windows_are_whole_documents_the_fit_never_reads(tmp_path):
    # 40 documents of 30 words: the check takes documents up to its 64 tokens, the fit the rest
    ids, confirm, notes = split_check(_docs(tmp_path, 40, 30), _Words(), 64, seq_len=8, samples=50, at_least=4)
    assert confirm is not None and confirm.tokens == 64 and not notes
    assert ids.shape == (50, 8)
    held = set(confirm.ids.unique().tolist()) - {0}
    assert 1 <= len(held) <= len(confirm.documents) < 40
    assert not held & set(ids.unique().tolist())  # no held-out document's token in the fit


def test_a_short_text_is_shared_and_a_very_short_one_is_not_checked(tmp_path):
    # 6 documents of 31 tokens with the separator: at most half is held out, the rest fits
    ids, confirm, notes = split_check(_docs(tmp_path, 6, 30), _Words(), 1000, seq_len=8, samples=50, at_least=4)
    assert confirm is not None and 0 < confirm.tokens < 1000 and "less than the 1,000 asked" in notes[0]
    assert ids.shape[0] >= 4
    # holding anything out would leave fewer than at_least rows: fit on everything, no check
    ids, confirm, notes = split_check(_docs(tmp_path, 2, 30), _Words(), 1000, seq_len=8, samples=50, at_least=6)
    assert confirm is None and ids.shape == (7, 8) and "too short" in notes[0]
    with pytest.raises(ShortTextError):
        split_check(_docs(tmp_path, 1, 10), _Words(), 1000, seq_len=8, samples=50, at_least=4)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("applycheck"))


def _apply(ws, tmp_path, out: str, *extra) -> list[str]:
    model = T.AutoModelForCausalLM.from_pretrained(ws.model)
    half_plan(model).save(tmp_path / "plan.json")
    return ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / out),
            "--repair-data", str(ws.calibration), "--repair-seq-len", "8", "--repair-experts-steps", "5",
            "--in-memory", *extra]


def test_grape_apply_auto_checks_its_repair_on_held_out_documents(ws, tmp_path, capsys):
    assert grape_main(_apply(ws, tmp_path, "auto", "--repair", "auto")) == 0
    printed = capsys.readouterr().out
    assert f"repair {AUTO_REPAIR}:" in printed and "repair check on" in printed
    record = json.loads((tmp_path / "auto" / "grape_provenance.json").read_text())
    check = record["repair"]["check"] if "repair" in record else record["repair_check"]
    assert check["tokens"] > 0 and check["documents"] >= 1
    # an explicitly named repair is not checked (and fits on the whole text)
    assert grape_main(_apply(ws, tmp_path, "named", "--repair", AUTO_REPAIR)) == 0
    assert "repair check on" not in capsys.readouterr().out
    named = json.loads((tmp_path / "named" / "grape_provenance.json").read_text())["repair"]
    assert "check" not in named and named["rows"] > (record.get("repair") or {"rows": 0})["rows"]


def test_a_repair_its_check_finds_worse_is_undone(ws, tmp_path, monkeypatch, capsys):
    # the held-out NLL says the repaired model is worse (the plain plan's NLL is measured first)
    calls = []

    def fake_nll(model, ids, plan=None, batch_size=8):
        calls.append(plan is not None)
        return np.full(ids.shape[0], 1.0 if plan is not None else 2.0)

    monkeypatch.setattr(repair_check, "held_out_nll", fake_nll)
    assert grape_main(_apply(ws, tmp_path, "undone", "--repair", "auto")) == 0
    assert calls == [True, False]
    assert "undone: the plan is applied without repair" in capsys.readouterr().out
    record = json.loads((tmp_path / "undone" / "grape_provenance.json").read_text())
    assert "repair" not in record and record["repair_check"]["kept"] is False
    assert grape_main(["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"),
                       "--out", str(tmp_path / "plain"), "--in-memory"]) == 0
    undone, plain = (load_file(tmp_path / d / "model.safetensors") for d in ("undone", "plain"))
    assert undone.keys() == plain.keys() and all(torch.equal(undone[k], plain[k]) for k in plain)
