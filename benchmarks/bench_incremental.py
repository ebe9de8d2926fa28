"""Full train vs incremental retrain after one file of a 20-file folder changed.

    python benchmarks/bench_incremental.py [--tokens 32] [--conversations 40] [--json]

Builds a 20-file folder (the bundled sample corpus cut into 20 pieces, each followed by a few generated
inventory sentences, so every file holds a couple of hundred tokens), trains version 1 from scratch,
edits one file, and retrains: the pipeline reuses the conversations of the 19 unchanged files,
synthesizes only for the changed one, warm-starts from version 1's cartridge and trains on the new
conversations plus an equal replay sample. Reports seconds, conversations synthesized and trained, and
optimizer steps for each, and the ratio. The model is loaded before either run, so neither pays for it.
Runs in a temporary data home unless --home is given. Uses the chunk teacher: with the corpus-wide
teacher every answer may draw on every file of a folder this small, so any edit means a full retrain.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures

N_FILES = 20
ITEMS = ["lathe", "band saw", "soldering station", "laser cutter", "3D printer", "drill press", "sewing machine",
         "kiln", "router table", "oscilloscope", "vinyl cutter", "welding bench"]
ROOMS = ["the wood shop", "room 4", "the electronics bench", "the mezzanine", "the loading bay", "the textile room"]
PEOPLE = ["Priya", "Tomasz", "Aiko", "Dele", "Marta", "Jonas", "Rosa", "Finn"]


def inventory(rng: random.Random, n: int) -> str:
    sentences = []
    for _ in range(n):
        item, room, person = rng.choice(ITEMS), rng.choice(ROOMS), rng.choice(PEOPLE)
        sentences.append(f"The {item} in {room} was last serviced by {person} on day {rng.randint(1, 28)} of "
                         f"month {rng.randint(1, 12)}, and needs {rng.randint(2, 9)} hours of induction before use.")
    return " ".join(sentences)


def make_folder(root: Path) -> list[Path]:
    """20 text files: consecutive pieces of the sample corpus, each with a few generated sentences."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "assets" / "sample").glob("*.md")))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    rng = random.Random(0)
    per_file = -(-len(paragraphs) // N_FILES)
    paths = []
    for i in range(N_FILES):
        body = "\n\n".join(paragraphs[i * per_file:(i + 1) * per_file])
        path = root / f"part-{i:02d}.md"
        path.write_text(f"{body}\n\n{inventory(rng, 4)}\n", encoding="utf-8")
        paths.append(path)
    return paths


def run_figures(db, outcome, began: float) -> dict:
    from engine.store import registry

    run = registry.get_run(db, outcome.run_id)
    config = json.loads(run["config"])
    increment = config.get("incremental")
    return {
        "version": outcome.version,
        "seconds": round(time.perf_counter() - began, 1),
        "conversations_synthesized": increment["new"] if increment else outcome.conversations,
        "conversations_reused": increment["reused"] if increment else 0,
        "conversations_trained": outcome.conversations,
        "steps": outcome.steps,
        "loss_first": round(outcome.loss_first, 4),
        "loss_last": round(outcome.loss_last, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="virtual tokens p (default 32)")
    parser.add_argument("--conversations", type=int, default=40, help="conversations of the full train (default 40)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--home", help="data home to use (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    os.environ["CARTRIDGE_HOME"] = str(home / "home")

    from engine.training import pipeline
    from engine.store import registry
    from engine.corpus.ingest import ingest
    from engine.engines.models import load_model

    settings = dict(preset="quick", p=args.tokens, conversations=args.conversations, batch_size=args.batch_size,
                    chunk_tokens=args.chunk_tokens, max_answer_tokens=args.max_answer_tokens, device=args.device,
                    teacher="chunk")
    folder = home / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    paths = make_folder(folder)
    db = registry.open_registry()
    first = ingest(folder, db=db)
    log = (lambda message: None) if args.json else (lambda message: print(message, file=sys.stderr, flush=True))
    log(f"{len(first.included)} files, {first.version['tokens']:,} tokens; loading the model")
    load_model(None, args.device)

    log("full train of v1")
    began = time.perf_counter()
    full = run_figures(db, pipeline.train(db, first.corpus["name"], **settings), began)

    changed = paths[7]
    changed.write_text(changed.read_text(encoding="utf-8") + "\n" + inventory(random.Random(1), 3) + "\n",
                       encoding="utf-8")
    second = ingest(folder, db=db)
    assert second.changed, "the edit did not change the manifest"
    log(f"edited {changed.name}; incremental retrain of v{second.version['number']}")
    began = time.perf_counter()
    incremental = run_figures(db, pipeline.train(db, first.corpus["name"], **settings), began)

    lm = load_model(None, args.device)
    result = {
        "files": len(first.included), "tokens": first.version["tokens"], "device": str(lm.device),
        "settings": {k: v for k, v in settings.items() if k != "device"},
        "full": full, "incremental": incremental,
        "speedup": round(full["seconds"] / max(incremental["seconds"], 1e-9), 2),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['files']} files, {result['tokens']:,} tokens, {result['device']}, "
          f"p={args.tokens}, {args.conversations} conversations for a full train")
    print(f"{'':<13}{'seconds':>9}{'synthesized':>13}{'reused':>8}{'trained':>9}{'steps':>7}")
    for name, row in (("full", full), ("incremental", incremental)):
        print(f"{name:<13}{row['seconds']:>9.1f}{row['conversations_synthesized']:>13}"
              f"{row['conversations_reused']:>8}{row['conversations_trained']:>9}{row['steps']:>7}")
    print(f"incremental retrain: {result['speedup']}x faster than the full train")


if __name__ == "__main__":
    main()
