"""Memory and speed at scale: a generated folder of many small files (a .gitignore in every folder).

    python benchmarks/bench_scale.py [--files 100000] [--tokens 2000000] [--per-folder 100] [--json]

Phases: generate the folder; ingest it cold (read, hash, tokenize, record, index passages); rescan it
unchanged (must write nothing to the registry); the start of training (assemble the corpus, tokenize it
for chunk sampling, draw the quick preset's chunks, the init text). Prints seconds and files/s per phase,
registry rows written by the rescan, and the peak RSS after each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # library deprecation notices stay out of the figures

WORDS = ("harbour tide lantern ledger copper signal meadow orchard quarry beacon ferry crate pontoon "
         "keeper gull anchor rope sail net buoy chart compass galley mast").split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate(root: Path, files: int, tokens: int, per_folder: int) -> None:
    """`files` notes of about tokens/files tokens each, `per_folder` to a folder, each folder with a
    .gitignore (and one ignored scratch file) so that nested rules are met all the way down."""
    rng = random.Random(0)
    words_per_file = max(3, int(tokens / files / 1.3))  # ~1.3 tokens per word with this vocabulary
    for i in range(files):
        folder = root / f"area{i // (per_folder * 10):03d}" / f"d{i // per_folder:05d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".gitignore").write_text("*.tmp\nscratch/\n")
            (folder / "draft.tmp").write_text("ignored\n")
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_file))
        (folder / f"note{i:06d}.md").write_text(f"Note {i}: {text}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--per-folder", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        os.environ["CARTRIDGE_HOME"] = str(Path(tmp) / "home")
        from engine.store import registry
        from engine.cartridge.format import corpus_init_text
        from engine.corpus.chunks import ChunkSampler, version_documents
        from engine.corpus.ingest import ingest
        from engine.training.pipeline import make_config
        from engine.engines.tokenizer import token_counter

        token_counter()  # converting the tokenizer is a one-time cost, not part of a scan
        phases, root = [], Path(tmp) / "folder"

        def phase(name: str, began: float, **figures) -> None:
            phases.append({"phase": name, "seconds": round(time.perf_counter() - began, 2),
                           "peak_rss_mb": round(peak_rss_mb(), 1), **figures})

        began = time.perf_counter()
        generate(root, args.files, args.tokens, args.per_folder)
        phase("generate", began)

        db = registry.open_registry()
        began = time.perf_counter()
        first = ingest(root, db=db)
        n = len(first.included)
        phase("ingest", began, files=n, tokens=first.version["tokens"],
              files_per_s=round(n / (time.perf_counter() - began)))

        writes = db.conn.total_changes
        began = time.perf_counter()
        again = ingest(root, db=db)
        phase("rescan unchanged", began, changed=again.changed, registry_rows_written=db.conn.total_changes - writes,
              files_per_s=round(n / (time.perf_counter() - began)))

        began = time.perf_counter()
        cfg = make_config("quick")
        sampler = ChunkSampler(version_documents(db, first.version))
        chunks = sampler.sample_many(cfg.conversations_for(sampler.n_tokens), cfg.chunk_tokens, seed=0, cover=True)
        corpus_init_text(sampler, cfg.p)
        phase("start of training", began, corpus_tokens=sampler.n_tokens, chunks=len(chunks),
              files_studied=len({path for c in chunks for path in c.files}))
    doc = {"files": args.files, "tokens": args.tokens, "phases": phases, "peak_rss_mb": round(peak_rss_mb(), 1)}
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"{args.files:,} files, ~{args.tokens:,} tokens, a .gitignore per {args.per_folder} files")
    for p in phases:
        extra = "  ".join(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
                          for k, v in p.items() if k not in ("phase", "seconds", "peak_rss_mb"))
        print(f"{p['phase']:<18} {p['seconds']:8.2f} s  peak RSS {p['peak_rss_mb']:7.1f} MB  {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
