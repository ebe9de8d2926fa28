"""Answer accuracy per decoding setting of the loop guard, on a trained corpus and a QA file with expect strings.

    python benchmarks/bench_decoding.py CORPUS --qa QA.jsonl [--ngrams 0,3,4,6] [--modes none,icl,cartridge]
        [--engine llama.cpp|torch] [--json]

For each `no_repeat_ngram` value (0: only the stop-and-cut when a 6-gram comes back a third time), every
mode answers every question greedily, up to the eval's token cap, exactly as chat decodes; prints the
accuracy and the mean answer length in words. The registry is the usual one ($CARTRIDGE_HOME).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus")
    parser.add_argument("--qa", required=True)
    parser.add_argument("--ngrams", default="0,3,4,6")
    parser.add_argument("--modes", default="none,icl,cartridge")
    parser.add_argument("--engine", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from engine.store import registry
    from engine.engines.decoding import Decoding
    from engine.serve.evaluate import EVAL_DECODING, evaluate

    db = registry.open_registry()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    rows = []
    for n in [int(x) for x in args.ngrams.split(",")]:
        decoding = Decoding(max_new_tokens=EVAL_DECODING.max_new_tokens, temperature=0.0, no_repeat_ngram=n)
        result = evaluate(db, args.corpus, args.qa, modes=modes, engine=args.engine, decoding=decoding)
        if not result["graded"]:
            print("error: the QA file has no lines with \"expect\"", file=sys.stderr)
            return 2
        row = {"no_repeat_ngram": n, "modes": {}}
        for mode, figures in result["modes"].items():
            words = [len(a["answer"].split()) for a in figures["answers"]]
            row["modes"][mode] = {"accuracy": figures["accuracy"], "mean_words": round(sum(words) / len(words), 1)}
        rows.append(row)
        if not args.json:
            print(f"no_repeat_ngram {n}: " + "   ".join(
                f"{m} {f['accuracy']:.1%} ({f['mean_words']} words)" for m, f in row["modes"].items()), flush=True)
    if args.json:
        print(json.dumps({"corpus": args.corpus, "qa": args.qa, "answer_tokens": EVAL_DECODING.max_new_tokens,
                          "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
