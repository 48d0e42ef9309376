"""The zoo test bed: committed models load offline and give finite logits; committed held-out
text has the documented JSONL format; the specialisation figures behave at their extremes."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ZOO_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo"
sys.path.insert(0, str(ZOO_DIR))

from zoo_configs import ZOO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DOMAINS = ("prose", "python", "c")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_loads_offline_and_gives_finite_logits(name):
    model_dir = ZOO_DIR / "models" / name
    if not (model_dir / "model.safetensors").exists():
        pytest.skip(f"zoo model {name} is not trained/committed yet")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    assert model.dtype == torch.bfloat16
    assert (model_dir / "model.safetensors").stat().st_size <= 15 * 1024 * 1024
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    ids = tokenizer(["def add(a, b):\n    return a + b\n", "The module provides functions."],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[:2] == ids["input_ids"].shape
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits.float()).all()


def test_tokenizer_round_trips_code_and_prose():
    tok_dir = ZOO_DIR / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        pytest.skip("zoo tokenizer not built yet")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    text = "int main(void) {\n\treturn 0;\n}\n\nThe *quick* brown fox.\n    x = 1  # éé"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tokenizer) == 4096


@pytest.mark.parametrize("split", ["validation", "test"])
def test_heldout_files_are_jsonl_documents_per_domain(split):
    for domain in DOMAINS:
        path = ZOO_DIR / "heldout" / f"{domain}.{split}.jsonl"
        if not path.exists():
            pytest.skip(f"{path} not built yet")
        assert path.stat().st_size <= 160_000
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) >= 5
        assert all(r["domain"] == domain and r["text"].strip() and r["source"] for r in records)


def test_heldout_and_calibration_documents_are_disjoint():
    heldout = ZOO_DIR / "heldout"
    if not (heldout / "calibration.jsonl").exists():
        pytest.skip("held-out files not built yet")
    sources = {}
    for path in sorted(heldout.glob("*.jsonl")):
        sources[path.name] = {json.loads(line)["source"] for line in path.read_text().splitlines()}
    names = sorted(sources)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sources[a] & sources[b], f"{a} and {b} share documents"


def test_specialisation_extremes():
    from report import specialisation

    n = 6
    # every expert serves one domain only: spec 1, MI = log2(3)
    one_each = {d: np.array([100 if e % 3 == i else 0 for e in range(n)]) for i, d in enumerate(DOMAINS)}
    s = specialisation(one_each)
    assert s["spec_index"] == pytest.approx(1.0)
    assert s["mi_bits"] == pytest.approx(math.log2(3))
    assert s["usage_entropy"] == pytest.approx(1.0)
    # identical usage in every domain: no specialisation
    same = {d: np.arange(1, n + 1) * 10 for d in DOMAINS}
    s = specialisation(same)
    assert s["spec_index"] == pytest.approx(1 / 3)
    assert s["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert s["usage_entropy"] < 1.0
