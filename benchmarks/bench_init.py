"""Where a cartridge starts: answer NLL (and accuracy) of untrained cartridges, per initialisation and p.

    python benchmarks/bench_init.py FOLDER --qa QA.jsonl [--inits first,spread,attention] [--p 256,576]
        [--accuracy] [--json]

Ingests the folder into a fresh data home and scores the QA's gold answers with no corpus, the corpus in
context (icl) and each untrained cartridge (`init_embeddings`, as training starts from), on llama.cpp as chat
answers. Prints per (p, init): NLL, the share of icl's NLL gain recovered (no icl for a folder longer than the
model's context), the seconds the initialisation took and, with --accuracy, answer accuracy on lines with
"expect". No training: a quick way to compare starts.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--qa", required=True)
    parser.add_argument("--inits", default="first,spread,attention")
    parser.add_argument("--p", default="256,576", help="comma-separated cartridge sizes")
    parser.add_argument("--accuracy", action="store_true", help="also generate answers and score expect strings")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ["CARTRIDGE_HOME"] = tempfile.mkdtemp(prefix="bench-init-")

    from engine.store import registry
    from engine.store.library import icl_fits
    from engine.cartridge.format import init_embeddings
    from engine.corpus.chunks import ChunkSampler, assemble, version_documents
    from engine.engines.decoding import contains_all
    from engine.serve.evaluate import EVAL_DECODING, Scorer, read_qa
    from engine.corpus.ingest import ingest
    from engine.engines.llamacpp import LlamaCppEngine
    from engine.engines.llamacpp_inference import LlamaCppInference
    from engine.engines.models import context_system_prompt, load_model

    db = registry.open_registry()
    version = ingest(args.folder, db=db).version
    documents = version_documents(db, version)
    lm = load_model(None, None)
    sampler = ChunkSampler(documents)
    llama = LlamaCppInference(LlamaCppEngine(n_ctx=lm.max_positions))
    qa = read_qa(args.qa)
    graded = [item for item in qa if item.get("expect")]

    def score(embeddings=None, system=None) -> dict:
        scorer = Scorer(llama, lm.tokenizer, embeddings=embeddings, system=system)
        out = {"nll": round(sum(scorer.nll(i["question"], i["answer"]) for i in qa) / len(qa), 4)}
        if args.accuracy and graded:
            right = sum(contains_all(scorer.answer(i["question"], EVAL_DECODING), i["expect"]) for i in graded)
            out["accuracy"] = round(right / len(graded), 4)
        return out

    say = (lambda *a: None) if args.json else print
    none = score()
    # A folder longer than the model's context has no icl figure; its starts are compared by NLL alone.
    icl = (score(system=context_system_prompt(assemble(documents)))
           if icl_fits(sampler.n_tokens, lm.max_positions) else None)
    say(f"{args.folder} ({sampler.n_tokens:,} tokens), {len(qa)} questions: NLL none {none['nll']:.3f}, "
        + (f"icl {icl['nll']:.3f}" if icl else "icl skipped (longer than the model's context)"))
    rows = []
    for p in (int(x) for x in args.p.split(",")):
        for how in args.inits.split(","):
            began = time.perf_counter()
            embeddings = init_embeddings(lm, sampler, p, how)
            seconds = time.perf_counter() - began
            row = {"p": p, "init": how, "seconds": round(seconds, 1), **score(embeddings)}
            gain = none["nll"] - icl["nll"] if icl else 0
            row["recovered"] = round((none["nll"] - row["nll"]) / gain, 4) if gain > 0 else None
            rows.append(row)
            acc = f"  accuracy {row['accuracy']:.0%}" if "accuracy" in row else ""
            share = f"  recovered {row['recovered']:.1%}" if row["recovered"] is not None else ""
            say(f"p={p:<5} {how:<10} NLL {row['nll']:.3f}{share}{acc}  ({seconds:.0f} s to initialise)")
    if args.json:
        print(json.dumps({"folder": str(Path(args.folder).resolve()), "tokens": sampler.n_tokens, "qa": args.qa,
                          "none": none, "icl": icl, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
