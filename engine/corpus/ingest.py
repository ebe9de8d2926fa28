"""Scan a folder into a corpus version: what is included, what is skipped and why.

Change detection follows the cheap-first order: mtime and size against the last scan, sha256 only
for files whose mtime or size changed, and a new version only when the manifest (included paths and
their content hashes) changed. All registry writes happen in one transaction at the end, so a failed
or interrupted scan leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from engine.store import registry
from engine.store.paths import app_paths
from engine.errors import UserError
from engine.corpus.rules import IgnoreRules, decode_text, is_secret
from engine.engines.tokenizer import token_counter

DEFAULT_MAX_FILE_BYTES = 1_000_000
DEFAULT_MAX_TOTAL_BYTES = 50_000_000


@dataclass
class ScanOptions:
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    allow_secrets: bool = False


@dataclass
class FileEntry:
    path: str
    status: str  # "included" | "skipped"
    reason: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    tokens: int | None = None
    encoding: str | None = None


@dataclass
class IngestResult:
    corpus: dict
    version: dict
    changed: bool
    files: list[FileEntry] = field(default_factory=list)

    @property
    def included(self) -> list[FileEntry]:
        return [f for f in self.files if f.status == "included"]

    def to_json(self) -> dict:
        return {
            "corpus": {"name": self.corpus["name"], "root": self.corpus["root"]},
            "version": self.version["number"],
            "changed": self.changed,
            "tokens": self.version["tokens"],
            "files": [{"path": f.path, "status": f.status, "reason": f.reason, "tokens": f.tokens} for f in self.files],
        }


def manifest_hash(entries: list[FileEntry]) -> str:
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(f"{entry.path}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def _walk(root: Path, rules: IgnoreRules, exclude: list[Path] = ()):
    """Yield (relative path, absolute path, skip reason or None) for every file under root.

    Symlinks are followed only when they resolve inside the root, and a folder reached twice (a loop)
    is visited once. Ignored folders are reported once, with a trailing slash, and not entered, and so are
    the `exclude` folders (the app's own: its cartridges and settings must never become a corpus's text).
    """
    seen_dirs = {_dir_key(root)}  # (device, inode): a folder on another mount may share an inode number
    excluded = {key for path in exclude if (key := _dir_key(path)) is not None}
    stack = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
        except FileNotFoundError:
            yield rel_dir + "/", abs_dir, "vanished during scan"
            continue
        except OSError as exc:
            yield rel_dir + "/", abs_dir, f"unreadable folder ({exc.strerror or exc})"
            continue
        gitignore = Path(abs_dir) / ".gitignore"
        if gitignore.is_file():
            try:
                rules.add_gitignore(rel_dir, gitignore.read_text(errors="replace").splitlines())
            except OSError:
                pass
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                if entry.is_symlink():
                    if not os.path.exists(entry.path):
                        yield rel, entry.path, "broken symlink"
                        continue
                    target = Path(os.path.realpath(entry.path))
                    if target != root and root not in target.parents:
                        yield rel, entry.path, "symlink pointing outside the folder"
                        continue
                is_dir = entry.is_dir()
            except OSError:
                yield rel, entry.path, "vanished during scan"
                continue
            if is_dir:
                if rules.ignored(rel, is_dir=True):
                    yield rel + "/", entry.path, "ignored"
                    continue
                try:
                    st = os.stat(entry.path)
                except OSError:
                    yield rel + "/", entry.path, "vanished during scan"
                    continue
                if (st.st_dev, st.st_ino) in seen_dirs:
                    yield rel + "/", entry.path, "symlink loop or duplicate folder"
                    continue
                if (st.st_dev, st.st_ino) in excluded:
                    yield rel + "/", entry.path, "the app's data folder"
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                subdirs.append((rel, entry.path))
            elif rules.ignored(rel):
                yield rel, entry.path, "ignored"
            else:
                yield rel, entry.path, None
        stack.extend(reversed(subdirs))


def _dir_key(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def scan(root: Path, rules: IgnoreRules, options: ScanOptions, catalog: dict[str, dict],
         on_progress: Callable[[int, str], None] | None = None, progress_bar: bool = False,
         ) -> tuple[list[FileEntry], dict[str, str]]:
    """Scan the folder; returns the file entries and the texts of files whose content was (re)read."""
    entries: list[FileEntry] = []
    new_texts: dict[str, str] = {}  # sha256 -> text
    to_count: list[FileEntry] = []
    total_bytes = 0
    bar = tqdm(desc="scanning", unit=" files", disable=not progress_bar, leave=False)
    for count, (rel, abs_path, reason) in enumerate(_walk(root, rules, exclude=app_paths()), start=1):
        bar.update(1)
        if on_progress:
            on_progress(count, rel)
        if reason:
            entries.append(FileEntry(rel, "skipped", reason))
            continue
        if is_secret(rel) and not options.allow_secrets:
            entries.append(FileEntry(rel, "skipped", "secret"))
            continue
        try:
            st = os.stat(abs_path)
        except FileNotFoundError:
            entries.append(FileEntry(rel, "skipped", "vanished during scan"))
            continue
        except OSError as exc:
            entries.append(FileEntry(rel, "skipped", f"unreadable ({exc.strerror or exc})"))
            continue
        if not stat.S_ISREG(st.st_mode):
            entries.append(FileEntry(rel, "skipped", "not a regular file"))
            continue
        if st.st_size > options.max_file_bytes:
            entries.append(FileEntry(rel, "skipped", f"too large ({st.st_size:,} bytes > {options.max_file_bytes:,})",
                                     size=st.st_size, mtime_ns=st.st_mtime_ns))
            continue
        if total_bytes + st.st_size > options.max_total_bytes:
            entries.append(FileEntry(rel, "skipped", f"total size cap reached ({options.max_total_bytes:,} bytes)",
                                     size=st.st_size, mtime_ns=st.st_mtime_ns))
            continue
        previous = catalog.get(rel)
        unchanged = previous and previous["size"] == st.st_size and previous["mtime_ns"] == st.st_mtime_ns
        if unchanged and previous["status"] == "included" and previous["sha256"] and previous["tokens"] is not None:
            entries.append(FileEntry(rel, "included", previous["reason"], st.st_size, st.st_mtime_ns,
                                     previous["sha256"], previous["tokens"], previous["encoding"]))
            total_bytes += st.st_size
            continue
        try:
            with open(abs_path, "rb") as handle:
                data = handle.read(options.max_file_bytes + 1)
        except FileNotFoundError:
            entries.append(FileEntry(rel, "skipped", "vanished during scan"))
            continue
        except OSError as exc:
            entries.append(FileEntry(rel, "skipped", f"unreadable ({exc.strerror or exc})"))
            continue
        text, encoding, skip = decode_text(data)
        if skip is None and not text.strip():
            skip = "empty"
        if skip:
            entries.append(FileEntry(rel, "skipped", skip, len(data), st.st_mtime_ns))
            continue
        entry = FileEntry(rel, "included", None if encoding == "utf-8" else f"decoded as {encoding}",
                          len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest(), None, encoding)
        new_texts[entry.sha256] = text
        to_count.append(entry)
        entries.append(entry)
        total_bytes += len(data)
    bar.close()
    if to_count:
        counts = token_counter()([new_texts[e.sha256] for e in to_count])
        for entry, n in zip(to_count, counts):
            entry.tokens = n
    return entries, new_texts


def _resolve_root(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"no such folder: {root}")
    if not root.is_dir():
        raise UserError(f"not a folder: {root} (point at the folder that holds it)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UserError(f"cannot read folder: {root} (permission denied)")
    root = Path(os.path.realpath(root))
    for own in app_paths():
        if root == own or own in root.parents:
            raise UserError(f"{root} is one of the app's own data folders ({own}): point at a folder of your own")
    return root


def _corpus_for(db, root: Path, name: str | None) -> dict | None:
    by_root = registry.find_corpus(db, root=str(root))
    if name is not None:
        by_name = registry.find_corpus(db, name=name)
        if by_name and by_name["root"] != str(root):
            raise UserError(f"the name {name!r} is already used for {by_name['root']}")
        if by_root and by_root["name"] != name:
            raise UserError(f"{root} is already ingested as {by_root['name']!r}")
    return by_root


def _unique_name(db, wanted: str) -> str:
    name, n = wanted or "corpus", 2
    while registry.find_corpus(db, name=name):
        name, n = f"{wanted}-{n}", n + 1
    return name


def ingest(path: str | Path, *, name: str | None = None, ignore: list[str] | None = None,
           options: ScanOptions | dict | None = None, db=None, progress_bar: bool = False,
           on_progress: Callable[[int, str], None] | None = None) -> IngestResult:
    """Scan `path` and record a new version of its corpus when the manifest changed.

    `ignore` and `options`, when given, replace the corpus's stored ones; otherwise the stored ones
    (or the defaults) apply. `options` as a dict changes only the settings it names.
    """
    db = db or registry.open_registry()
    root = _resolve_root(path)
    corpus = _corpus_for(db, root, name)
    if ignore is None:
        ignore = corpus["ignore"] if corpus else []
    stored = ScanOptions(**corpus["options"]) if corpus else ScanOptions()
    if options is None:
        options = stored
    elif isinstance(options, dict):
        options = replace(stored, **options)
    catalog = registry.file_catalog(db, corpus["id"]) if corpus else {}
    entries, new_texts = scan(root, IgnoreRules(extra=list(ignore)), options, catalog,
                              on_progress=on_progress, progress_bar=progress_bar)
    included = [e for e in entries if e.status == "included"]
    if not included:
        if not entries:
            raise UserError(f"the folder is empty: {root}")
        reasons = sorted({e.reason for e in entries})
        raise UserError(f"no readable text files in {root} ({len(entries)} skipped: {'; '.join(reasons)[:200]})")
    # Text of unchanged files is normally stored already; re-read any that is not (e.g. after a repair).
    missing = registry.missing_blobs(db, (e.sha256 for e in included if e.sha256 not in new_texts))
    for entry in included:
        if entry.sha256 in missing and entry.sha256 not in new_texts:
            text, _, _ = decode_text(Path(root, entry.path).read_bytes())
            new_texts[entry.sha256] = text or ""
    digest = manifest_hash(included)
    with registry.transaction(db):
        if corpus is None:
            corpus = registry.create_corpus(db, _unique_name(db, name or root.name), str(root), ignore, asdict(options))
        elif list(ignore) != corpus["ignore"] or asdict(options) != corpus["options"]:
            registry.update_corpus(db, corpus["id"], ignore=list(ignore), options=asdict(options))
        registry.sync_file_catalog(db, corpus["id"], (asdict(e) for e in entries), catalog)
        latest = registry.latest_version(db, corpus["id"])
        changed = latest is None or latest["manifest_hash"] != digest
        if changed:
            registry.store_blobs(db, {e.sha256: new_texts[e.sha256] for e in included if e.sha256 in new_texts})
            version = registry.create_version(
                db, corpus["id"], digest, [{"path": e.path, "sha256": e.sha256, "tokens": e.tokens} for e in included]
            )
            registry.add_event(db, corpus["id"], "version", f"version {version['number']} recorded",
                               {"files": version["files"], "tokens": version["tokens"]})
        else:
            version = latest
    if changed:
        from engine.corpus.retrieval import index_version

        index_version(db, version)  # retrieval (rag modes) searches the version's passages
    corpus = registry.get_corpus(db, corpus["name"])
    return IngestResult(corpus, version, changed, sorted(entries, key=lambda e: e.path))
