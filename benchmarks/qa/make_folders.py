"""Build the folders the question sets in this directory are about, from wheels installed in this environment.

    python benchmarks/qa/make_folders.py DEST

Writes DEST/semver, DEST/fts4, DEST/pysocks, DEST/diskcache, DEST/psutil, DEST/orjson and DEST/termdocs.
A README is the long description in the wheel's METADATA (everything after the first blank line).
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import distribution
from pathlib import Path


def long_description(dist: str) -> str:
    text = distribution(dist).read_text("METADATA") or ""
    _, _, body = text.partition("\n\n")
    return body.strip() + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    dest = Path(argv[0])
    folders = {
        "semver": {"README.rst": long_description("semantic_version")},
        "fts4": {"README.md": long_description("sqlite-fts4"),
                 "sqlite_fts4.py": Path(importlib.util.find_spec("sqlite_fts4").origin).read_text()},
        "pysocks": {"README.md": long_description("PySocks")},
        "diskcache": {"README.rst": long_description("diskcache")},
        "psutil": {"README.rst": long_description("psutil")},
        # Beyond the model's context: a JSON library's README (~14k tokens) and the docs of two
        # terminal-output libraries (~29k tokens).
        "orjson": {"README.md": long_description("orjson")},
        "termdocs": {"tqdm.rst": long_description("tqdm"), "tabulate.md": long_description("tabulate")},
    }
    for name, files in folders.items():
        for filename, text in files.items():
            path = dest / name / filename
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(dest / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
