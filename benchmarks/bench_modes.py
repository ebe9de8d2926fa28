"""KV memory, time to first token and decode speed of one corpus with no corpus, the corpus in context and its cartridge.

    python benchmarks/bench_modes.py CORPUS [--engine llama.cpp|torch] [--new-tokens 64] [--repeats 3] [--json]

The corpus must have a trained cartridge (`cartridge train CORPUS`); the registry is the usual one
($CARTRIDGE_HOME). Each mode answers the same question in a fresh chat (nothing cached but the cartridge,
which a chat loads once when it opens), generating `--new-tokens` tokens without stopping; figures are
medians over `--repeats` runs after one warm-up, one mode at a time. KV bytes count the cache held when
the first token is produced (prefix + prompt), as the chat reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures

QUESTION = "What are the opening hours, and who should I ask about membership?"
MODES = ("none", "icl", "cartridge")


def run_mode(db, corpus: str, mode: str, engine: str | None, new_tokens: int, repeats: int, lm=None) -> dict:
    from engine.serve.inference import open_chat, resolve, torch_chat

    def fresh_chat():
        if lm is not None:  # torch: one model for every chat
            return torch_chat(db, resolve(db, [corpus], mode=mode), lm=lm)
        return open_chat(db, [corpus], mode=mode, engine=engine)

    rows = []
    for attempt in range(repeats + 1):
        chat = fresh_chat()
        chat.stop_ids = set()  # always generate the full count
        reply = chat.reply([{"role": "user", "content": QUESTION}], max_new_tokens=new_tokens if attempt else 4)
        if attempt:  # the first run warms up
            rows.append(reply)
        close = getattr(getattr(chat, "llama", None), "close", None)
        if close:
            close()
    return {"kv_bytes": rows[0].kv_bytes, "ttft_s": statistics.median(r.ttft_s for r in rows),
            "decode_tok_s": statistics.median(r.tokens_per_s for r in rows), "engine": rows[0].engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--engine", choices=("llama.cpp", "torch"), default=None,
                        help="inference engine (default: llama.cpp for the bundled model, torch otherwise)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    from engine.store import registry
    from engine.serve.inference import choose_engine, resolve

    db = registry.open_registry()
    target = resolve(db, [args.corpus], mode="cartridge")
    engine = choose_engine(args.engine, target.model_spec)
    lm = None
    if engine == "torch":
        from engine.engines.models import load_model

        lm = load_model(target.model_spec)
    modes = {mode: run_mode(db, args.corpus, mode, engine, args.new_tokens, args.repeats, lm) for mode in MODES}
    icl, cart = modes["icl"], modes["cartridge"]
    ratios = {"kv_icl_over_cartridge": icl["kv_bytes"] / cart["kv_bytes"],
              "ttft_icl_over_cartridge": icl["ttft_s"] / max(cart["ttft_s"], 1e-9),
              "decode_cartridge_over_icl": cart["decode_tok_s"] / max(icl["decode_tok_s"], 1e-9)}
    result = {"corpus": args.corpus, "version": target.versions[0]["number"], "engine": engine,
              "question": QUESTION, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "load_avg_1min": round(os.getloadavg()[0], 2), "modes": modes, "ratios": ratios,
              "targets_met": {"kv_le_1_8_of_icl": ratios["kv_icl_over_cartridge"] >= 8,
                              "ttft_le_1_20_of_icl": ratios["ttft_icl_over_cartridge"] >= 20}}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.corpus} v{result['version']} on {engine}: {args.new_tokens} new tokens, median of {args.repeats} "
          f"(1-min load average at the end: {result['load_avg_1min']})")
    print(f"{'mode':<10} {'KV MB':>9} {'TTFT s':>9} {'decode tok/s':>13}")
    for mode, m in modes.items():
        print(f"{mode:<10} {m['kv_bytes'] / 1e6:>9.2f} {m['ttft_s']:>9.3f} {m['decode_tok_s']:>13.1f}")
    print(f"icl / cartridge: KV {ratios['kv_icl_over_cartridge']:.1f}x, time to first token "
          f"{ratios['ttft_icl_over_cartridge']:.1f}x; cartridge decodes {ratios['decode_cartridge_over_icl']:.2f}x "
          "as fast as icl")
    met = result["targets_met"]
    print(f"targets: cartridge KV <= 1/8 of icl {'met' if met['kv_le_1_8_of_icl'] else 'NOT met'}; "
          f"time to first token <= 1/20 of icl {'met' if met['ttft_le_1_20_of_icl'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
