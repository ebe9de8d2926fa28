"""A folder beyond the model's context: no corpus, retrieval, the cartridge and both together, compared.

    python benchmarks/qa/make_folders.py /tmp/folders
    python benchmarks/bench_bigfolder.py /tmp/folders/termdocs --qa benchmarks/qa/termdocs_qa.jsonl
        [--preset quick] [--setting "key=value ..."] [--engine llama.cpp|torch] [--home DIR] [--json]

Ingests the folder into a data home (a fresh temporary one unless --home), trains its cartridge with the
preset (and the optional overrides, as in bench_quality), then evaluates the QA file in the modes none,
rag, init (the untrained cartridge), cartridge and cartridge+rag. rag's retrieved budget is the
cartridge's p tokens, so rag and the cartridge hold about the same KV memory; "rag 2p" retrieves twice as
many, the memory cartridge+rag holds. Prints per mode the answer NLL, the accuracy (answers containing every
expect string), the KV bytes and the time to first token, the training minutes, and whether the targets
hold: cartridge+rag beats rag (and rag 2p), and the cartridge beats none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures

MODES = ("none", "rag", "init", "cartridge", "cartridge+rag")
WIDE = "rag 2p"  # retrieval of twice the cartridge's p tokens: as much KV memory as cartridge+rag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--qa", required=True)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--setting", default="", help="training overrides: key=value ... (as bench_quality)")
    parser.add_argument("--engine", default=None, help="eval engine (default: llama.cpp for the bundled model)")
    parser.add_argument("--home", help="data home to use (default: a fresh temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ["CARTRIDGE_HOME"] = args.home or tempfile.mkdtemp(prefix="bench-bigfolder-")

    from bench_quality import parse_setting
    from engine.training import pipeline
    from engine.store import registry
    from engine.serve.evaluate import evaluate
    from engine.corpus.ingest import ingest
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    _, overrides = parse_setting(f"run: {args.setting}")
    db = registry.open_registry()
    name = ingest(args.folder).corpus["name"]
    tokens = registry.latest_version(db, registry.get_corpus(db, name)["id"])["tokens"]
    say(f"{name}: {tokens:,} tokens; training with preset {args.preset} {overrides or ''}")
    began = time.perf_counter()
    outcome = pipeline.train(db, name, preset=args.preset, incremental=False, **overrides)
    minutes = (time.perf_counter() - began) / 60
    say(f"trained in {minutes:.1f} min (p={outcome.tokens}, {outcome.conversations} conversations, "
        f"{outcome.steps} steps); evaluating {', '.join(MODES)}")
    result = evaluate(db, name, args.qa, modes=MODES, engine=args.engine)
    # retrieval given the KV memory cartridge+rag holds: the cartridge's p tokens and as many retrieved
    wide = evaluate(db, name, args.qa, modes=("rag",), engine=args.engine, rag_tokens=2 * outcome.tokens)
    result["modes"][WIDE] = wide["modes"]["rag"]
    modes = {m: {k: result["modes"][m].get(k) for k in ("nll", "accuracy", "kv_bytes", "ttft_s")}
             for m in (*MODES, WIDE) if m in result["modes"]}
    def beats(a: str, b: str) -> bool:  # more answers right, then a lower NLL
        return ((modes[a]["accuracy"] or 0.0), -modes[a]["nll"]) > ((modes[b]["accuracy"] or 0.0), -modes[b]["nll"])

    doc = {"folder": str(Path(args.folder).resolve()), "qa": args.qa, "questions": result["questions"], "engine": result["engine"],
           "corpus_tokens": tokens, "preset": args.preset, "overrides": overrides, "p": outcome.tokens,
           "conversations": outcome.conversations, "steps": outcome.steps, "train_minutes": round(minutes, 1),
           "heldout": outcome.heldout["score"] if outcome.heldout else None, "modes": modes,
           "skipped": result.get("skipped", {}),
           "targets": {f"{a} beats {b}": beats(a, b)
                       for a, b in (("cartridge+rag", "rag"), ("cartridge+rag", WIDE), ("cartridge", "none"))}}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['folder']}: {tokens:,} tokens, {args.qa}; {args.preset} {overrides or ''}: p={doc['p']}, "
          f"{doc['conversations']} conversations, {doc['steps']} steps, {doc['train_minutes']} min, "
          f"held-out {doc['heldout']}")
    print(f"{'mode':<14} {'NLL':>7} {'accuracy':>9} {'KV MB':>8} {'TTFT s':>8}")
    for mode, m in modes.items():
        accuracy = "-" if m["accuracy"] is None else f"{m['accuracy']:.0%}"
        print(f"{mode:<14} {m['nll']:>7.3f} {accuracy:>9} {m['kv_bytes'] / 1e6:>8.2f} {m['ttft_s']:>8.3f}")
    for mode, why in doc["skipped"].items():
        print(f"{mode}: skipped ({why})")
    for target, met in doc["targets"].items():
        print(f"target: {target} (accuracy, then NLL): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from engine.errors import exit_with

    exit_with(main)
