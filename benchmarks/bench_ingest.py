"""Ingest speed: a generated folder of N small text files, scanned cold and then again unchanged.

Prints files/s for the first scan (read, hash, tokenize, record) and the rescan (mtime + size only).
Usage: python benchmarks/bench_ingest.py [--files 10000]
"""

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CARTRIDGE_HOME"] = str(Path(tmp) / "home")
        from engine.corpus.ingest import ingest
        from engine.store.registry import open_registry
        from engine.engines.tokenizer import token_counter

        token_counter()  # the tokenizer conversion is a one-time cost, not part of a scan
        root = Path(tmp) / "notes"
        rng = random.Random(0)
        words = "harbour tide lantern ledger copper signal meadow orchard quarry beacon".split()
        for i in range(args.files):
            folder = root / f"d{i // 100:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 300)))
            (folder / f"note{i:05d}.md").write_text(f"# Note {i}\n\n{text}\n")
        db = open_registry()
        start = time.perf_counter()
        first = ingest(root, db=db)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        again = ingest(root, db=db)
        warm = time.perf_counter() - start
        n = len(first.included)
        print(f"files: {n:,}  tokens: {first.version['tokens']:,}")
        print(f"first scan: {cold:.2f} s  ({n / cold:,.0f} files/s)")
        print(f"rescan, nothing changed: {warm:.2f} s  ({n / warm:,.0f} files/s, changed={again.changed})")


if __name__ == "__main__":
    main()
