"""Which files of a folder belong in a corpus: ignore rules, secret-looking names, text detection."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pathspec

# Folders and files that are never content: version control, dependencies, virtualenvs, caches,
# build outputs, lock files, editors' and note apps' own state (.idea/, .vscode/, .obsidian/).
# Written as gitignore patterns.
BUILTIN_EXCLUDES = [
    ".git/", ".hg/", ".svn/", ".bzr/", "node_modules/", "bower_components/", ".venv/", "venv/", ".env/",
    "env/", "virtualenv/", "__pycache__/", ".mypy_cache/", ".pytest_cache/", ".ruff_cache/", ".tox/", ".nox/",
    ".cache/", ".gradle/", ".idea/", ".vscode/", ".next/", ".nuxt/", ".parcel-cache/", ".turbo/",
    "build/", "dist/", "target/", "out/", "_build/", "*.egg-info/", ".eggs/", "coverage/", "htmlcov/",
    ".ipynb_checkpoints/", ".obsidian/", ".trash/", ".Trash/", ".fseventsd/", ".Spotlight-V100/", ".DS_Store",
    "Thumbs.db", "*.pyc", "*.pyo", "*.class", "*.o", "*.so", "*.dll",
    "*.dylib", "*.exe", "*.min.js", "*.map", "*.swp", "*~",
    "package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "Pipfile.lock", "uv.lock",
    "Cargo.lock", "composer.lock", "Gemfile.lock", "go.sum", "*.lock",
]

# Names that usually hold credentials. A trained cartridge carries its corpus, and people share
# cartridges, so these stay out unless the user opts in.
SECRET_PATTERNS = [
    ".env", ".env.*", "*.env", "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12",
    "*.pfx", "*.keystore", "*.jks", "credentials", "credentials.*", "*credentials*.json", ".netrc", ".pgpass",
    ".npmrc", ".pypirc", "secrets.*", "*.secret", ".htpasswd",
]

_SECRETS = pathspec.GitIgnoreSpec.from_lines(SECRET_PATTERNS)


def is_secret(rel_path: str) -> bool:
    return _SECRETS.match_file(PurePosixPath(rel_path).name)


@dataclass
class IgnoreRules:
    """Built-in excludes + the corpus's own patterns + every `.gitignore` met on the way down.

    A nested `.gitignore` applies to paths relative to its own folder, as git does.
    """

    extra: list[str] = field(default_factory=list)
    _specs: dict[str, list[pathspec.GitIgnoreSpec]] = field(default_factory=dict)  # folder -> its rules

    def __post_init__(self):
        self._specs = {"": [pathspec.GitIgnoreSpec.from_lines(BUILTIN_EXCLUDES + list(self.extra))]}

    def add_gitignore(self, rel_dir: str, lines: list[str]) -> None:
        self._specs.setdefault(rel_dir, []).append(pathspec.GitIgnoreSpec.from_lines(lines))

    def ignored(self, rel_path: str, is_dir: bool = False) -> bool:
        """True when a path (relative to the root, `/`-separated) is excluded by any rule that sees it.

        Only the rules of the path's own ancestors are looked up (by folder), so a walk costs the depth
        of each path, not the number of `.gitignore` files met so far.
        """
        parts = rel_path.split("/")
        for depth in range(len(parts)):
            base = "/".join(parts[:depth])
            specs = self._specs.get(base)
            if not specs:
                continue
            sub = "/".join(parts[depth:]) + ("/" if is_dir else "")
            if any(spec.match_file(sub) for spec in specs):
                return True
        return False


BINARY_SNIFF_BYTES = 8192
FALLBACK_ENCODING = "cp1252"


def decode_text(data: bytes) -> tuple[str | None, str | None, str | None]:
    """(text, encoding, skip reason). Detects text by content, not by extension.

    UTF-8 (with or without BOM) and BOM-marked UTF-16 decode as such; other 8-bit text decodes as
    cp1252 when it has no control characters; anything with NUL bytes or control noise is binary.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), "utf-16", None
        except UnicodeDecodeError:
            return None, None, "binary (invalid UTF-16)"
    head = data[:BINARY_SNIFF_BYTES]
    if b"\x00" in head:
        return None, None, "binary"
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13, 27))
    if head and controls / len(head) > 0.01:
        return None, None, "binary"
    try:
        return data.decode("utf-8-sig"), "utf-8", None
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode(FALLBACK_ENCODING)
    except UnicodeDecodeError:
        return None, None, "not UTF-8 text and not decodable as cp1252"
    return text, FALLBACK_ENCODING, None
