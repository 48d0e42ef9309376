"""A tiny on-disk workspace for the command-line and API tests: a tiny qwen3_moe model saved with
its tokenizer, calibration text, held-out text in two domains, and (for the error cases) a model
of another MoE family and one of an unsupported architecture."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiny_models import make_tiny, make_tiny_tokenizer

PROSE = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "A journey of a thousand miles begins with a single step, and every step counts.",
    "Rivers carve valleys over millions of years, shaping the land that people farm.",
    "The library opens at nine in the morning and closes late in the evening on weekdays.",
    "Music fills the hall as the orchestra tunes its strings before the concert begins.",
    "Winter nights are long in the north, and the stars shine brightly over the snow.",
]
CODE = [
    "def add(a, b):\n    total = a + b\n    return total\n\nprint(add(1, 2))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue",
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def step(self):\n        self.count += 1",
    "import os\n\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "while True:\n    line = input()\n    if not line:\n        break\n    print(line.upper())",
]


@dataclass
class Workspace:
    root: Path
    model: Path  # tiny qwen3_moe + tokenizer
    other_model: Path  # tiny mixtral + tokenizer (another model)
    dense_model: Path  # tiny llama (not an MoE family GRAPE supports)
    calibration: Path  # JSONL
    heldout: list[Path]  # JSONL per domain


def make_tokenizer():
    return make_tiny_tokenizer(PROSE + CODE, vocab_size=300)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_workspace(root: Path) -> Workspace:
    import transformers as T

    tok = make_tokenizer()
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
               "eos_token_id": tok.eos_token_id}
    model = _save(make_tiny("qwen3_moe", **ids), tok, root / "qwen3")
    other = _save(make_tiny("mixtral", **ids), tok, root / "mixtral")
    llama = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, **ids))
    dense = _save(llama, tok, root / "llama")
    # calibration: repeated text, enough tokens for a few short sequences
    calibration = _write_jsonl(root / "calibration.jsonl",
                               [{"text": t} for t in (PROSE + CODE) * 4])
    heldout_dir = root / "heldout"
    heldout_dir.mkdir()
    heldout = [_write_jsonl(heldout_dir / "prose.test.jsonl", [{"text": t, "domain": "prose"} for t in PROSE]),
               _write_jsonl(heldout_dir / "code.test.jsonl", [{"text": t, "domain": "code"} for t in CODE])]
    return Workspace(root, model, other, dense, calibration, heldout)


# small settings for `grape run` on the tiny model: seconds on a CPU
RUN_FLAGS = ["--samples", "4", "--seq-len", "32", "--subsample", "32", "--eval-tokens", "128",
             "--eval-seq-len", "32", "--compare-time-limit", "5", "--time-limit", "10", "--no-progress",
             "--device", "cpu", "--search-passes", "8", "--search-tokens", "256", "--confirm-tokens", "512"]
