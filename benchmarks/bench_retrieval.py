"""How often retrieval finds the answer: the share of questions whose retrieved passages hold every expect string.

    python benchmarks/bench_retrieval.py FOLDER --qa QA.jsonl [--tokens 512,1024] [--home DIR] [--show] [--json]

Ingests the folder into a data home (a fresh temporary one unless --home) and, for each budget (default: the
rag budget chat and eval would use, the quick preset's p for the folder's size), retrieves each question's
passages exactly as the rag modes do. No model runs, only its tokenizer, so it takes seconds. Set beside the
rag mode's accuracy from `eval`, it tells a miss of retrieval (the passage was not found) from a miss of
reading (the passage was in the prompt, the answer was still wrong). `--show` prints each question's verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--qa", required=True)
    parser.add_argument("--tokens", default="", help="comma-separated budgets (default: the rag modes' budget)")
    parser.add_argument("--home", help="data home to use (default: a fresh temporary folder)")
    parser.add_argument("--show", action="store_true", help="print each question's verdict")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ["CARTRIDGE_HOME"] = args.home or tempfile.mkdtemp(prefix="bench-retrieval-")

    from engine.corpus.ingest import ingest
    from engine.corpus.retrieval import rag_prompt
    from engine.engines.decoding import contains_all
    from engine.engines.tokenizer import load_tokenizer
    from engine.serve.evaluate import read_qa
    from engine.serve.inference import resolve
    from engine.store import registry

    questions = [q for q in read_qa(args.qa) if q.get("expect")]
    if not questions:
        print("error: the QA file has no lines with \"expect\"", file=sys.stderr)
        return 2
    db = registry.open_registry()
    name = ingest(args.folder).corpus["name"]
    target = resolve(db, [name], mode="rag")
    budgets = [int(t) for t in args.tokens.split(",") if t.strip()] or [target.rag_tokens]
    tokenizer = load_tokenizer(None)
    rows = []
    for budget in budgets:
        found, detail = 0, []
        for q in questions:
            prompt, passages = rag_prompt(db, target.versions, q["question"], budget, tokenizer)
            hit = contains_all(prompt, q["expect"])
            found += hit
            detail.append({"question": q["question"], "expect": q["expect"], "found": hit,
                           "sources": [p.label() for p in passages]})
        rows.append({"tokens": budget, "found": found, "questions": len(questions), "detail": detail})
        if not args.json:
            print(f"{name}, {budget} retrieved tokens: the passages hold every expect string for {found} of "
                  f"{len(questions)} questions ({found / len(questions):.0%})")
            if args.show:
                for d in detail:
                    print(f"  {'found ' if d['found'] else 'missed'}  {d['question']}  expect {d['expect']}")
    if args.json:
        print(json.dumps({"folder": str(Path(args.folder).resolve()), "qa": args.qa, "rows": rows}))
    return 0


if __name__ == "__main__":
    from engine.errors import exit_with

    exit_with(main)
