"""Answer quality per training setting: trains a folder's cartridge with each setting and evaluates it.

    python benchmarks/bench_quality.py FOLDER --qa QA.jsonl \
        --setting "chunk-teacher: teacher=chunk" --setting "corpus-teacher: teacher=corpus" [--preset quick]
        [--engine llama.cpp|torch] [--home DIR] [--json] [--answers FILE]

A setting is `NAME: key=value ...` with keys of the training configuration (p, conversations, epochs,
teacher, lr, lr_schedule, init, loss_on, max_answer_tokens, ...) applied over the preset. All settings
train the same corpus version in one data home (a fresh temporary one unless --home). A version keeps
the conversations of one set of self-study settings, so consecutive settings that share them (teacher,
chunk and answer sizes, seed) reuse the conversations made first; `synth` says whether a run made any.
Prints, per setting: minutes spent, answer NLL and accuracy (QA lines with "expect") for none / icl /
init / cartridge, the share of icl's NLL gain recovered, and the cartridge's held-out score. none and icl
do not depend on the setting and are evaluated once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures


def parse_setting(text: str) -> tuple[str, dict]:
    """`NAME: key=value ...` -> (NAME, {key: typed value}), typed from the training configuration."""
    from engine.errors import UserError
    from engine.training.distill import TrainConfig

    name, _, rest = text.partition(":")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    overrides = {}
    for pair in rest.split():
        key, _, value = pair.partition("=")
        if key not in kinds:
            raise UserError(f"unknown setting {key!r} in {text!r}")
        kind = str(kinds[key])
        overrides[key] = (float(value) if "float" in kind else int(value) if "int" in kind else value)
    return name.strip() or "default", overrides


def recovered(none: float, icl: float, nll: float) -> float | None:
    return round((none - nll) / (none - icl), 4) if none - icl > 1e-9 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--qa", required=True)
    parser.add_argument("--setting", action="append", default=[], help="NAME: key=value ... (repeatable)")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--engine", default=None, help="eval engine (default: llama.cpp for the bundled model)")
    parser.add_argument("--home", help="data home to use (default: a fresh temporary folder)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--answers", metavar="FILE", help="also write each generated answer (JSON Lines: setting, "
                        "mode, question, answer, correct), to see which questions a setting gets right")
    args = parser.parse_args(argv)
    os.environ["CARTRIDGE_HOME"] = args.home or tempfile.mkdtemp(prefix="bench-quality-")

    from engine.training import pipeline
    from engine.store import registry
    from engine.serve.evaluate import evaluate
    from engine.corpus.ingest import ingest

    settings = [parse_setting(s) for s in args.setting] or [("preset", {})]
    db = registry.open_registry()
    name = ingest(args.folder).corpus["name"]
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    baseline, rows = None, []
    for label, overrides in settings:
        say(f"[{label}] training with {overrides or 'the preset'}")
        made = {"synthesis": 0}

        def on_progress(progress, made=made):
            if progress.phase == "synthesis":
                made["synthesis"] = max(made["synthesis"], progress.done)

        began = time.perf_counter()
        outcome = pipeline.train(db, name, preset=args.preset, incremental=False, on_progress=on_progress, **overrides)
        minutes = (time.perf_counter() - began) / 60
        modes = ("none", "icl", "init", "cartridge") if baseline is None else ("init", "cartridge")
        say(f"[{label}] evaluating {', '.join(modes)}")
        result = evaluate(db, name, args.qa, modes=modes, engine=args.engine)
        if baseline is None:
            baseline = {m: result["modes"][m] for m in ("none", "icl")}
        if args.answers:
            with open(args.answers, "a", encoding="utf-8") as out:
                for mode in modes:
                    for answer in result["modes"][mode].get("answers", []):
                        out.write(json.dumps({"setting": label, "mode": mode, **answer}) + "\n")
        figures = {**baseline, **result["modes"]}
        none, icl = figures["none"]["nll"], figures["icl"]["nll"]
        row = {"setting": label, "overrides": overrides, "minutes": round(minutes, 2), "synth": made["synthesis"] > 0,
               "conversations": outcome.conversations, "steps": outcome.steps,
               "heldout": outcome.heldout["score"] if outcome.heldout else None,
               "nll": {m: figures[m]["nll"] for m in ("none", "icl", "init", "cartridge")},
               "accuracy": {m: figures[m].get("accuracy") for m in ("none", "icl", "init", "cartridge")},
               "recovered": recovered(none, icl, figures["cartridge"]["nll"]),
               "recovered_init": recovered(none, icl, figures["init"]["nll"]),
               "kv_ratio": round(figures["icl"]["kv_bytes"] / figures["cartridge"]["kv_bytes"], 2)}
        rows.append(row)
        say(format_row(row))
    doc = {"folder": str(Path(args.folder).resolve()), "qa": args.qa, "preset": args.preset, "corpus": name,
           "tokens": registry.get_version(db, registry.get_corpus(db, name))["tokens"], "rows": rows}
    if args.json:
        print(json.dumps(doc))
    else:
        print(f"{doc['folder']} ({doc['tokens']:,} tokens), {args.qa}, preset {args.preset}")
        for row in rows:
            print(format_row(row))
    return 0


def format_row(row: dict) -> str:
    def acc(mode):
        value = row["accuracy"][mode]
        return "  -  " if value is None else f"{value:5.0%}"

    nll, rec = row["nll"], row["recovered"]
    return (f"{row['setting']:<22} {row['minutes']:6.1f} min{'' if row['synth'] else ' (reused)'}  "
            f"NLL none {nll['none']:.3f} icl {nll['icl']:.3f} init {nll['init']:.3f} cart {nll['cartridge']:.3f}  "
            f"acc {acc('none')} {acc('icl')} {acc('init')} {acc('cartridge')}  "
            f"recovered {'-' if rec is None else f'{rec:.1%}'}  held-out {row['heldout']}  KV 1/{row['kv_ratio']}")


if __name__ == "__main__":
    from engine.errors import exit_with

    exit_with(main)
