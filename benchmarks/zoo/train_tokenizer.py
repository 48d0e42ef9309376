"""Train the zoo's byte-level BPE tokenizer (vocab 4096) on the train split of every domain and
save it as a `PreTrainedTokenizerFast` directory (tokenizer.json + tokenizer_config.json) that
`AutoTokenizer.from_pretrained(dir)` loads offline. Every zoo model shares it.

    python benchmarks/zoo/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ZOO = Path(__file__).resolve().parent
sys.path.insert(0, str(ZOO.parents[1]))

DOMAINS = ("prose", "python", "c")
EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
SPECIAL_TOKENS = [EOS, BOS, PAD]


def iter_train_text(data_dir: Path):
    for domain in DOMAINS:
        with open(data_dir / f"{domain}.train.jsonl", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]


def train(data_dir: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(iter_train_text(data_dir), trainer=trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS,
                                   pad_token=PAD, unk_token=None, model_max_length=256)
    fast.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ZOO / "data")
    parser.add_argument("--out", type=Path, default=ZOO / "tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    tok = train(args.data, args.vocab_size)
    save(tok, args.out)
    print(f"saved {tok.get_vocab_size()} tokens to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
