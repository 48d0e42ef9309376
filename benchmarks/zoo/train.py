"""Train one zoo model on CPU within a wall-clock budget and save it (bf16, HF format, with the
tokenizer) into benchmarks/zoo/models/<name>/.

The learning rate follows linear warmup then a cosine decay over *elapsed time* (fraction of
`--minutes`), so a run ends on schedule however busy the shared CPU is; the number of steps
actually taken is recorded in zoo_train.json beside the weights.

    python benchmarks/zoo/train.py qwen3moe-32x4 --minutes 30
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ZOO_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(ZOO_DIR))
sys.path.insert(0, str(ZOO_DIR.parents[1]))
from zoo_configs import RETIRED, SEQ_LEN, ZOO

DOMAINS = ("prose", "python", "c")


def log(handle, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if handle is not None:
        handle.write(line + "\n")
        handle.flush()


def tokenize_docs(tokenizer, path: Path) -> np.ndarray:
    """All documents of a JSONL file as one token stream, each document followed by eos."""
    with open(path, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.uint16)


def train_tokens(tokenizer, data_dir: Path, domain: str) -> np.ndarray:
    cache = data_dir / f"{domain}.train.tokens.npy"
    source = data_dir / f"{domain}.train.jsonl"
    tok_file = ZOO_DIR / "tokenizer" / "tokenizer.json"
    if cache.exists() and cache.stat().st_mtime > max(source.stat().st_mtime, tok_file.stat().st_mtime):
        return np.load(cache)
    tokens = tokenize_docs(tokenizer, source)
    np.save(cache, tokens)
    return tokens


def eval_windows(tokenizer, path: Path, n: int) -> torch.Tensor:
    tokens = tokenize_docs(tokenizer, path)
    count = min(n, len(tokens) // SEQ_LEN)
    return torch.from_numpy(tokens[: count * SEQ_LEN].astype(np.int64)).view(count, SEQ_LEN)


class RouterTap:
    """Forward hooks on every router: keep its logits and chosen experts for the aux loss."""

    def __init__(self, model: torch.nn.Module):
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.routers = [m for m in model.modules()
                        if type(m).__name__.lower().endswith(("topkrouter", "topk_router"))]
        self.handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, output):
        logits, _, index = output
        self.captured.append((logits, index))

    def load_balancing_loss(self, score: str) -> torch.Tensor:
        """Switch-style loss per layer, N * sum_e f_e * P_e, averaged over layers; P uses the
        router's own score function (softmax, or sigmoid normalised per token as in DeepSeek-V3)."""
        losses = []
        for logits, index in self.captured:
            n = logits.shape[-1]
            if score == "sigmoid":
                s = logits.float().sigmoid()
                probs = s / s.sum(-1, keepdim=True)
            else:
                probs = logits.float().softmax(-1)
            counts = torch.zeros(n, device=logits.device).scatter_add_(
                0, index.reshape(-1), torch.ones(index.numel(), device=logits.device))
            f = counts / index.numel()
            losses.append(n * (f * probs.mean(0)).sum())
        self.captured.clear()
        return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor], batch: int = 16) -> dict[str, float]:
    model.eval()
    out = {}
    for domain, w in windows.items():
        total, count = 0.0, 0
        for i in range(0, len(w), batch):
            x = w[i:i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
        out[domain] = total / count
    model.train()
    return out


def save_checkpoint(model, tokenizer, out_dir: Path, summary: dict) -> None:
    """Write bf16 weights + tokenizer + summary into a temp dir, then swap it in by rename."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    export = copy.deepcopy(model).to(torch.bfloat16).eval()
    export.config.output_router_logits = False
    export.config.use_cache = True
    export.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    (tmp / "zoo_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def lr_at(step: int, frac_time: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(max(frac_time, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def upcycle(dense: torch.nn.Module, moe: torch.nn.Module, noise: float, seed: int) -> list[str]:
    """Copy a dense-equivalent model (one expert, top-1) into an MoE of the same body: every
    tensor of matching shape is copied; expert tensors (leading dim 1 -> E) are repeated into
    every expert with Gaussian noise of `noise` times the tensor's std, so experts start alike
    but not identical; routers (shape (1, h) -> (E, h)) keep their fresh initialisation.
    Returns the names of the tensors that were left fresh."""
    gen = torch.Generator().manual_seed(seed)
    source = dict(dense.named_parameters())
    fresh = []
    with torch.no_grad():
        for name, target in moe.named_parameters():
            src = source.get(name)
            if src is not None and src.shape == target.shape:
                target.copy_(src)
            elif (src is not None and src.dim() == 3 and src.shape[0] == 1
                    and src.shape[1:] == target.shape[1:]):
                base = src.expand_as(target)
                jitter = torch.randn(target.shape, generator=gen) * (noise * float(src.std()))
                target.copy_(base + jitter)
            else:
                fresh.append(name)
    return fresh


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


class Phase:
    """One training run of `model` within a wall-clock budget (warmup + cosine over elapsed
    time), with periodic evaluation and (when `save` is set) atomic checkpoints."""

    def __init__(self, model, args, spec, streams, val, logf, label: str, save=None):
        self.model, self.args, self.spec = model, args, spec
        self.streams, self.val, self.logf, self.label, self.save = streams, val, logf, label, save
        # the dense phase draws other windows than the MoE phase that follows it
        self.rng = np.random.default_rng([args.seed, label == "dense"])
        self.step, self.tokens, self.history = 0, 0, []
        self.start = time.time()

    def batch(self) -> torch.Tensor:
        per_domain = self.args.batch // len(DOMAINS)
        extra = self.args.batch - per_domain * len(DOMAINS)
        rows = []
        for i, domain in enumerate(DOMAINS):
            s = self.streams[domain]
            for off in self.rng.integers(0, len(s) - SEQ_LEN - 1, size=per_domain + (i < extra)):
                rows.append(s[off:off + SEQ_LEN])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def run(self, minutes: float) -> None:
        model, args = self.model, self.args
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("grouped_mm")
        tap = RouterTap(model)
        opt = make_optimizer(model, args.lr)
        model.train()
        budget_s = minutes * 60
        self.start = last_save = last_eval = time.time()
        while (elapsed := time.time() - self.start) < budget_s:
            for group in opt.param_groups:
                group["lr"] = lr_at(self.step, elapsed / budget_s, args.lr, args.warmup)
            x = self.batch()
            tap.captured.clear()
            out = model(input_ids=x, labels=x)
            aux = tap.load_balancing_loss(self.spec.router_score)
            loss = out.loss + args.aux_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            self.step += 1
            self.tokens += x.numel()
            if self.step % 10 == 0:
                log(self.logf, f"{self.label} step {self.step} lm {out.loss.item():.4f} aux {aux.item():.4f} "
                               f"lr {opt.param_groups[0]['lr']:.2e} tok/s {self.tokens / (time.time() - self.start):.0f} "
                               f"elapsed {(time.time() - self.start) / 60:.1f}m")
            now = time.time()
            if now - last_eval >= args.eval_every_min * 60:
                self.evaluate(tap, out.loss.item())
                last_eval = time.time()
            if self.save is not None and now - last_save >= args.save_every_min * 60:
                self.save(self, False)
                log(self.logf, f"checkpoint at step {self.step}")
                last_save = time.time()
        self.evaluate(tap, None)
        for handle in tap.handles:
            handle.remove()

    def evaluate(self, tap: RouterTap, train_lm: float | None) -> None:
        tap.captured.clear()
        v = evaluate(self.model, self.val)
        tap.captured.clear()
        row = {"step": self.step, "minutes": (time.time() - self.start) / 60, "val": v}
        if train_lm is not None:
            row["train_lm"] = train_lm
        self.history.append(row)
        log(self.logf, f"{self.label} eval step {self.step}: " + " ".join(f"{d}={x:.3f}" for d, x in v.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(ZOO) + sorted(RETIRED))
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall-clock training budget (dense phase included for upcycled models)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--aux-coef", type=float, default=None,
                        help="load-balancing loss weight (default: the model's, see zoo_configs.py)")
    parser.add_argument("--upcycle-noise", type=float, default=0.1,
                        help="upcycled models: expert noise, as a fraction of each tensor's std")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every-min", type=float, default=10.0)
    parser.add_argument("--eval-every-min", type=float, default=5.0)
    parser.add_argument("--data", type=Path, default=ZOO_DIR / "data")
    parser.add_argument("--out", type=Path, default=ZOO_DIR / "models")
    parser.add_argument("--log-dir", type=Path, default=ZOO_DIR / "logs")
    args = parser.parse_args(argv)

    import transformers as T

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = {**ZOO, **RETIRED}[args.name]
    if args.aux_coef is None:
        args.aux_coef = spec.aux_coef
    args.log_dir.mkdir(parents=True, exist_ok=True)
    logf = open(args.log_dir / f"{args.name}.log", "a")  # noqa: SIM115 - closed at the end of main
    log(logf, f"== {args.name}: {spec.description}; budget {args.minutes} min; aux {args.aux_coef}")

    tokenizer = T.AutoTokenizer.from_pretrained(str(ZOO_DIR / "tokenizer"))
    streams = {d: train_tokens(tokenizer, args.data, d) for d in DOMAINS}
    log(logf, "train tokens: " + ", ".join(f"{d}={len(s)}" for d, s in streams.items()))
    val = {d: eval_windows(tokenizer, ZOO_DIR / "heldout" / f"{d}.validation.jsonl", 32) for d in DOMAINS}

    dense_summary = None
    moe_minutes = args.minutes
    model = T.AutoModelForCausalLM.from_config(spec.make_config())
    if spec.upcycle_from is not None:
        dense_minutes = args.minutes * spec.upcycle_fraction
        moe_minutes = args.minutes - dense_minutes
        dense = T.AutoModelForCausalLM.from_config(spec.upcycle_from())
        log(logf, f"dense phase: {dense_minutes:.1f} min")
        phase = Phase(dense, args, spec, streams, val, logf, "dense")
        phase.run(dense_minutes)
        dense_summary = {"minutes": dense_minutes, "steps": phase.step, "tokens": phase.tokens,
                         "history": phase.history, "upcycle_noise": args.upcycle_noise}
        fresh = upcycle(dense, model, args.upcycle_noise, args.seed)
        log(logf, f"upcycled into {spec.make_config().num_local_experts} experts; fresh tensors: {fresh}")
    n_params = sum(p.numel() for p in model.parameters())
    log(logf, f"params {n_params} ({2 * n_params / 1e6:.2f} MB bf16)")

    def summary(phase: Phase, done: bool) -> dict:
        total_tokens = phase.tokens + (dense_summary["tokens"] if dense_summary else 0)
        return {"name": args.name, "description": spec.description, "params": n_params,
                "steps": phase.step, "tokens": total_tokens,
                "minutes": (time.time() - phase.start) / 60 + (dense_summary["minutes"] if dense_summary else 0),
                "budget_minutes": args.minutes, "batch": args.batch, "seq_len": SEQ_LEN,
                "peak_lr": args.lr, "aux_coef": args.aux_coef, "seed": args.seed,
                "tokens_per_s": phase.tokens / max(time.time() - phase.start, 1e-9),
                "finished": done, "val_nll_quick": phase.history[-1]["val"] if phase.history else None,
                "history": phase.history, "upcycled_from_dense": dense_summary}

    def save(phase: Phase, done: bool) -> None:
        save_checkpoint(phase.model, tokenizer, args.out / args.name, summary(phase, done))

    phase = Phase(model, args, spec, streams, val, logf, "moe", save=save)
    phase.run(moe_minutes)
    save(phase, True)
    log(logf, f"saved {args.out / args.name} after {phase.step} steps, {phase.tokens} tokens")
    logf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
