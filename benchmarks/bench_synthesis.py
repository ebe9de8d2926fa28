"""Self-study synthesis speed of the two backends (llama.cpp and transformers) on the same chunks.

    python benchmarks/bench_synthesis.py [--conversations 24] [--chunk-tokens 512] [--answer-tokens N] [--json]

Chunks are drawn from the bundled sample corpus with the bundled seed prompts and the `quick` preset's
turn lengths; the backends run one after the other (never both at once). Prints conversations per
minute, the mean answer length, and how many user turns came from message templates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures


def run_backend(lm, chunks, n: int, backend: str, seeds: dict, cfg) -> dict:
    from engine.selfstudy.synthesis import synthesize

    start = time.perf_counter()
    convs = list(synthesize(lm, chunks, n, seeds=seeds, max_user_tokens=cfg.max_user_tokens,
                            max_answer_tokens=cfg.max_answer_tokens, seed=cfg.seed, backend=backend))
    seconds = time.perf_counter() - start
    answer_tokens = sum(c.n_tokens for c in convs)
    return {"conversations": len(convs), "seconds": round(seconds, 1),
            "per_min": round(len(convs) / seconds * 60, 2) if seconds else 0.0,
            "mean_answer_tokens": round(answer_tokens / max(len(convs), 1), 1),
            "templated_user_turns": sum(_templated(c, seeds) for c in convs)}


def _templated(conversation, seeds: dict) -> bool:
    """Whether the user turn was a filled message template rather than written by the model."""
    from engine.selfstudy.prompts import PLACEHOLDER, is_direct

    for seed in seeds.get(conversation.seed_type, []):
        if is_direct(seed):
            pattern = re.escape(seed)
            for name in set(PLACEHOLDER.findall(seed)):
                pattern = pattern.replace(re.escape("{" + name + "}"), ".+")
            if re.fullmatch(pattern, conversation.user, re.S):
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=24, help="conversations per backend (default 24)")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="chunk size in tokens (default 512)")
    parser.add_argument("--answer-tokens", type=int, help="longest answer (default: the quick preset's)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    from engine.corpus.chunks import ChunkSampler, Document
    from engine.engines.models import load_model
    from engine.selfstudy.prompts import load_seed_prompts
    from engine.training.distill import PRESETS

    cfg = PRESETS["quick"]
    if args.answer_tokens:
        cfg = cfg.replace(max_answer_tokens=args.answer_tokens)
    docs = [Document(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.read_text(encoding="utf-8"))
            for p in sorted((ROOT / "assets" / "sample").glob("*.md"))]
    # Extra chunks: a chunk whose user turn fails the filter twice is skipped.
    chunks = ChunkSampler(docs).sample_many(args.conversations * 3, args.chunk_tokens, seed=1)
    seeds = load_seed_prompts(ROOT / "assets" / "seeds")
    lm = load_model(None, "cpu")
    results = {backend: run_backend(lm, chunks, args.conversations, backend, seeds, cfg)
               for backend in ("llamacpp", "torch")}
    speedup = results["llamacpp"]["per_min"] / max(results["torch"]["per_min"], 1e-9)
    doc = {"chunk_tokens": args.chunk_tokens, "max_answer_tokens": cfg.max_answer_tokens,
           "load_avg_1min": round(os.getloadavg()[0], 2), "backends": results, "llamacpp_over_torch": round(speedup, 2)}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"self-study on the sample corpus: chunks of {args.chunk_tokens} tokens, answers up to "
          f"{cfg.max_answer_tokens} tokens (1-min load average at the end: {doc['load_avg_1min']})")
    print(f"{'backend':<10} {'conv':>5} {'seconds':>8} {'conv/min':>9} {'answer tok':>11} {'templated':>10}")
    for name, r in results.items():
        print(f"{name:<10} {r['conversations']:>5} {r['seconds']:>8.1f} {r['per_min']:>9.2f} "
              f"{r['mean_answer_tokens']:>11.1f} {r['templated_user_turns']:>10}")
    print(f"llama.cpp / transformers: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
