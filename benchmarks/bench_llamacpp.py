"""Decode speed and time to first token with a cartridge: llama.cpp (cartridge injected) vs torch (PEFT layout).

    python benchmarks/bench_llamacpp.py [--p 128] [--new-tokens 64] [--repeats 3] [--json]

The cartridge is initialised from the first p tokens of the bundled sample corpus (the KV of those
tokens, computed by torch), so both back ends run the very same cartridge and prompt. Each back end
generates `--new-tokens` tokens greedily without stopping; the figures are medians over `--repeats`
runs after one warm-up. Time to first token is measured from the call with the cartridge already in
place (torch: cache built per turn, as in chat; llama.cpp: the cartridge is injected once per chat, its
time is reported separately). "+head" is llama.cpp with the chat template's fixed head (default system
prompt and user header, the same for every chat) evaluated right after the cartridge at inject time, so
the first reply pays only for the user's own tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures

QUESTION = "Summarise the safety rules for the laser cutter in three sentences."


def sample_text() -> str:
    folder = ROOT / "assets" / "sample"
    return "".join(f"### File: {p.name}\n{p.read_text(encoding='utf-8')}\n\n" for p in sorted(folder.glob("*.md")))


def torch_cartridge(lm, p: int):
    """The KV of the first p init tokens as a [p, width] cartridge tensor (PEFT layout)."""
    import torch

    from engine.cartridge.format import init_ids

    ids = init_ids(lm, p, sample_text())
    with torch.no_grad():
        cache = lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=True).cache
    layers = []
    for layer in range(lm.n_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [heads, p, dim]
        layers.append(torch.stack([keys, values], dim=0).permute(2, 0, 1, 3))  # [p, 2, heads, dim]
    return torch.stack(layers, dim=1).reshape(p, -1).float().cpu()


def bench_torch(lm, embeddings, prompt, new_tokens: int) -> dict:
    from engine.engines.torch_engine import TorchEngine

    engine = TorchEngine(lm)
    engine.set_prefix(embeddings)
    marks: list[float] = []
    start = time.perf_counter()
    out = engine.generate(prompt, new_tokens, stop_ids=set(), on_token=lambda _t: marks.append(time.perf_counter())).tokens
    end = time.perf_counter()
    ttft = marks[0] - start
    decode = (len(out) - 1) / (end - marks[0]) if len(out) > 1 else 0.0
    return {"ttft_s": ttft, "decode_tok_s": decode, "n": len(out)}


def bench_llama(engine, embeddings, prompt, new_tokens: int, warm_ids=None) -> dict:
    t0 = time.perf_counter()
    engine.inject(embeddings, warm_ids=warm_ids)
    inject_s = time.perf_counter() - t0
    stats = engine.timed_generate(prompt, new_tokens, stop_ids=set())
    return {"ttft_s": stats.ttft_s, "decode_tok_s": stats.decode_tokens_per_s, "n": len(stats.tokens),
            "inject_s": inject_s}


def bench_streamed(engine, embeddings, prompt, new_tokens: int) -> dict:
    """Decode speed and time to first token as a chat sees them: every token streamed back to the caller
    (for the worker process, one round trip per token)."""
    engine.inject(embeddings)
    marks: list[float] = []
    start = time.perf_counter()
    engine.generate(prompt, new_tokens, stop_ids=set(), on_token=lambda _t: marks.append(time.perf_counter()))
    return {"ttft_s": marks[0] - start,
            "decode_tok_s": (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else 0.0}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=128, help="cartridge length in virtual tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per back end (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp decode threads (default: half the cores, at most 4)")
    parser.add_argument("--threads-batch", type=int, default=None,
                        help="llama.cpp prompt threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    import torch

    from engine.engines.llamacpp import LlamaCppEngine, template_prefix_ids
    from engine.engines.models import chat_ids, load_model

    lm = load_model()
    embeddings = torch_cartridge(lm, args.p)
    prompt = chat_ids(lm.tokenizer, [{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    engine = LlamaCppEngine(n_ctx=max(512, args.p + len(prompt) + args.new_tokens + 16), n_threads=args.threads,
                            n_threads_batch=args.threads_batch)

    # One at a time (never both back ends at once): warm-up, then the timed runs.
    head = template_prefix_ids(lm.tokenizer)
    bench_llama(engine, embeddings, prompt, 4)
    llama_rows = [bench_llama(engine, embeddings, prompt, args.new_tokens) for _ in range(args.repeats)]
    warm_rows = [bench_llama(engine, embeddings, prompt, 2, warm_ids=head) for _ in range(args.repeats)]
    # The same engine as chat runs it, in its worker process, against this process's engine, streamed.
    from engine.engines.llamacpp_worker import LlamaCppProcess

    worker = LlamaCppProcess(n_ctx=engine.n_ctx, n_threads=args.threads, n_threads_batch=args.threads_batch)
    stream_rows, worker_rows = [], []
    for target, rows in ((engine, stream_rows), (worker, worker_rows)):
        bench_streamed(target, embeddings, prompt, 4)
        rows.extend(bench_streamed(target, embeddings, prompt, args.new_tokens) for _ in range(args.repeats))
    worker.close()
    bench_torch(lm, embeddings, prompt, 4)
    torch_rows = [bench_torch(lm, embeddings, prompt, args.new_tokens) for _ in range(args.repeats)]

    result = {
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "p": args.p,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "llama_cpp": {"decode_tok_s": median(llama_rows, "decode_tok_s"), "ttft_s": median(llama_rows, "ttft_s"),
                      "inject_s": median(llama_rows, "inject_s"), "threads": engine.n_threads, "threads_batch": engine.n_threads_batch,
                      "thread_fallbacks": engine.governor.fallbacks if engine.governor else 0,
                      "ttft_warm_s": median(warm_rows, "ttft_s"), "inject_warm_s": median(warm_rows, "inject_s"),
                      "template_head_tokens": len(head),
                      "gpu_layers": engine.n_gpu_layers},
        "torch": {"decode_tok_s": median(torch_rows, "decode_tok_s"), "ttft_s": median(torch_rows, "ttft_s"),
                  "device": str(lm.device), "autocast": str(lm.autocast_dtype), "threads": torch.get_num_threads()},
    }
    result["streamed"] = {"in_process_decode_tok_s": median(stream_rows, "decode_tok_s"),
                          "worker_decode_tok_s": median(worker_rows, "decode_tok_s"),
                          "in_process_ttft_s": median(stream_rows, "ttft_s"), "worker_ttft_s": median(worker_rows, "ttft_s")}
    result["streamed"]["worker_over_in_process"] = (result["streamed"]["worker_decode_tok_s"]
                                                    / max(result["streamed"]["in_process_decode_tok_s"], 1e-9))
    result["decode_speedup"] = result["llama_cpp"]["decode_tok_s"] / max(result["torch"]["decode_tok_s"], 1e-9)
    result["ttft_speedup"] = result["torch"]["ttft_s"] / max(result["llama_cpp"]["ttft_s"], 1e-9)
    result["targets_met"] = {"decode_4x": result["decode_speedup"] >= 4.0,
                             "ttft_le_0_1s": result["llama_cpp"]["ttft_s"] <= 0.1,
                             "ttft_warm_le_0_1s": result["llama_cpp"]["ttft_warm_s"] <= 0.1,
                             "worker_decode_within_10pct": result["streamed"]["worker_over_in_process"] >= 0.9}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    lc, tc = result["llama_cpp"], result["torch"]
    print(f"cartridge p={args.p}, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, median of {args.repeats} "
          f"(1-min load average at the end: {result['load_avg_1min']})")
    print(f"{'backend':<10} {'decode tok/s':>13} {'TTFT s':>8}")
    print(f"{'llama.cpp':<10} {lc['decode_tok_s']:>13.1f} {lc['ttft_s']:>8.3f}   (inject {lc['inject_s'] * 1000:.1f} ms, "
          f"{lc['threads']}/{lc['threads_batch']} decode/prompt threads, "
          f"{lc['thread_fallbacks']} starved-thread fallbacks)")
    print(f"{'  +head':<10} {'':>13} {lc['ttft_warm_s']:>8.3f}   (template head of {lc['template_head_tokens']} tokens "
          f"evaluated with the cartridge at inject: {lc['inject_warm_s'] * 1000:.1f} ms)")
    print(f"{'torch':<10} {tc['decode_tok_s']:>13.1f} {tc['ttft_s']:>8.3f}   ({tc['device']}, autocast {tc['autocast']}, {tc['threads']} threads)")
    st = result["streamed"]
    print(f"{'streamed':<10} {st['in_process_decode_tok_s']:>13.1f} {st['in_process_ttft_s']:>8.3f}   (llama.cpp in this process, "
          "each token handed to a callback)")
    print(f"{'  worker':<10} {st['worker_decode_tok_s']:>13.1f} {st['worker_ttft_s']:>8.3f}   (llama.cpp in its worker process, "
          f"as chat runs it: {st['worker_over_in_process']:.0%} of the in-process decode speed)")
    print(f"llama.cpp / torch decode: {result['decode_speedup']:.2f}x   TTFT: {result['ttft_speedup']:.2f}x faster")
    print(f"targets: decode >= 4x {'met' if result['targets_met']['decode_4x'] else 'NOT met'}; "
          f"TTFT <= 0.1 s {'met' if result['targets_met']['ttft_le_0_1s'] else 'NOT met'} "
          f"(with the template head pre-evaluated: {'met' if result['targets_met']['ttft_warm_le_0_1s'] else 'NOT met'}); "
          f"worker decode within 10% {'met' if result['targets_met']['worker_decode_within_10pct'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
