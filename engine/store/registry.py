"""The SQLite registry: corpora, files, versions, training runs, chats and events.

This is the only module that speaks SQL. Schema changes are forward-only migrations: each is a new
function appended to MIGRATIONS, applied once and recorded in `_migrations`; `PRAGMA user_version`
mirrors the count so other tools can read the schema version cheaply.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from engine.errors import UserError
from engine.store.paths import registry_path

MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = []


def migration(fn):
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["corpora"].create(
        {"id": int, "name": str, "root": str, "created": float, "ignore": str, "options": str,
         "current_version": int, "watch": int},
        pk="id", not_null={"name", "root"}, defaults={"ignore": "[]", "options": "{}", "watch": 0},
    )
    db["corpora"].create_index(["name"], unique=True)
    db["corpora"].create_index(["root"], unique=True)
    db["files"].create(
        {"id": int, "corpus_id": int, "path": str, "size": int, "mtime_ns": int, "sha256": str,
         "tokens": int, "status": str, "reason": str, "encoding": str, "updated": float},
        pk="id", foreign_keys=[("corpus_id", "corpora", "id")], not_null={"corpus_id", "path", "status"},
    )
    db["files"].create_index(["corpus_id", "path"], unique=True)
    db["blobs"].create({"sha256": str, "text": str}, pk="sha256")
    db["versions"].create(
        {"id": int, "corpus_id": int, "number": int, "manifest_hash": str, "files": int, "tokens": int,
         "status": str, "created": float, "cartridge": str, "error": str},
        pk="id", foreign_keys=[("corpus_id", "corpora", "id")], not_null={"corpus_id", "number", "status"},
    )
    db["versions"].create_index(["corpus_id", "number"], unique=True)
    db["version_files"].create(
        {"version_id": int, "path": str, "sha256": str, "tokens": int},
        pk=("version_id", "path"), foreign_keys=[("version_id", "versions", "id"), ("sha256", "blobs", "sha256")],
    )


@migration
def m002_training_runs(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {"id": int, "corpus_id": int, "version_id": int, "status": str, "config": str, "started": float,
         "finished": float, "error": str, "cartridge": str, "summary": str, "pid": int},
        pk="id", foreign_keys=[("corpus_id", "corpora", "id"), ("version_id", "versions", "id")],
    )
    db["run_metrics"].create(
        {"run_id": int, "phase": str, "step": int, "loss": float, "tokens_per_s": float, "elapsed_s": float,
         "data": str},
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["run_metrics"].create_index(["run_id", "step"])


@migration
def m003_chats_and_events(db: sqlite_utils.Database) -> None:
    db["chats"].create(
        {"id": int, "title": str, "created": float, "updated": float, "corpora": str, "mode": str},
        pk="id",
    )
    db["messages"].create(
        {"id": int, "chat_id": int, "role": str, "content": str, "created": float, "meta": str},
        pk="id", foreign_keys=[("chat_id", "chats", "id")],
    )
    db["messages"].create_index(["chat_id"])
    db["events"].create(
        {"id": int, "corpus_id": int, "kind": str, "message": str, "created": float, "data": str},
        pk="id", foreign_keys=[("corpus_id", "corpora", "id")],
    )
    db["events"].create_index(["corpus_id", "created"])


@migration
def m004_corpus_uid_and_heldout(db: sqlite_utils.Database) -> None:
    """A corpus uid that is never reused names its folders on disk (ids can come back after a delete);
    existing corpora keep their old folder names. Versions keep their cartridge's held-out score."""
    db["corpora"].add_column("uid", str)
    db.execute("UPDATE corpora SET uid = 'c' || id")
    db["corpora"].create_index(["uid"], unique=True)
    db["versions"].add_column("heldout", float)


@migration
def m005_run_process_start(db: sqlite_utils.Database) -> None:
    """When the process of a run started: with the pid, it tells a live run from a reused pid."""
    db["runs"].add_column("pid_started", float)


@migration
def m006_passages(db: sqlite_utils.Database) -> None:
    """Passages of each file text (by content hash, so unchanged files are indexed once) for retrieval,
    with an FTS5 index that triggers keep in step."""
    db["passages"].create({"id": int, "sha256": str, "start_line": int, "end_line": int, "text": str},
                          pk="id", foreign_keys=[("sha256", "blobs", "sha256")])
    db["passages"].create_index(["sha256"])
    db["passages"].enable_fts(["text"], fts_version="FTS5", tokenize="porter unicode61", create_triggers=True)


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite_utils.Database) -> None:
    """Apply, in order, the migrations not yet recorded."""
    db["_migrations"].create({"name": str, "applied_at": float}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db["_migrations"].rows}
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.atomic():
            fn(db)
            db["_migrations"].insert({"name": fn.__name__, "applied_at": time.time()})
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")


def open_registry(path: Path | None = None) -> sqlite_utils.Database:
    """Open (creating and migrating as needed) the registry with WAL and foreign keys on."""
    path = Path(path) if path else registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            db = sqlite_utils.Database(conn)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA secure_delete=ON")  # deleted text is overwritten, not left in free pages
            migrate(db)
            return db
        except sqlite3.OperationalError as exc:
            # Two connections creating a fresh registry at once: one waits for the other's migration.
            if "locked" not in str(exc) or attempt == 4:
                raise UserError(f"cannot open the registry {path}: {exc}") from None
            time.sleep(0.2 * (attempt + 1))
        except sqlite3.DatabaseError as exc:
            raise UserError(f"cannot open the registry {path}: {exc}") from None


@contextmanager
def transaction(db: sqlite_utils.Database):
    """All-or-nothing block: on any exception nothing written inside it stays."""
    with db.atomic():
        yield db


# -- corpora ---------------------------------------------------------------------------------------

def _decode_corpus(row: dict) -> dict:
    row = dict(row)
    row["ignore"] = json.loads(row.get("ignore") or "[]")
    row["options"] = json.loads(row.get("options") or "{}")
    row["watch"] = bool(row.get("watch"))
    return row


def find_corpus(db, *, name: str | None = None, root: str | None = None) -> dict | None:
    where, args = ("name = ?", [name]) if name is not None else ("root = ?", [root])
    rows = list(db["corpora"].rows_where(where, args))
    return _decode_corpus(rows[0]) if rows else None


def get_corpus(db, name: str) -> dict:
    """The corpus called `name`, or a UserError listing the known names."""
    corpus = find_corpus(db, name=name)
    if corpus is None:
        known = ", ".join(c["name"] for c in list_corpora(db)) or "none yet; run `cartridge ingest PATH`"
        raise UserError(f"no corpus named {name!r} (known: {known})")
    return corpus


def list_corpora(db) -> list[dict]:
    return [_decode_corpus(r) for r in db["corpora"].rows_where(order_by="name")]


def create_corpus(db, name: str, root: str, ignore: list[str] | None = None, options: dict | None = None) -> dict:
    corpus_id = db["corpora"].insert(
        {"name": name, "root": root, "created": time.time(), "ignore": json.dumps(ignore or []),
         "options": json.dumps(options or {}), "current_version": None, "watch": 0,
         "uid": uuid.uuid4().hex}
    ).last_pk
    return _decode_corpus(db["corpora"].get(corpus_id))


def update_corpus(db, corpus_id: int, **fields) -> None:
    for key in ("ignore", "options"):
        if key in fields:
            fields[key] = json.dumps(fields[key])
    if "watch" in fields:
        fields["watch"] = int(bool(fields["watch"]))
    db["corpora"].update(corpus_id, fields)


def rename_corpus(db, name: str, new_name: str) -> None:
    corpus = get_corpus(db, name)
    if find_corpus(db, name=new_name):
        raise UserError(f"a corpus named {new_name!r} already exists")
    with db.atomic():
        update_corpus(db, corpus["id"], name=new_name)
        for chat in db["chats"].rows_where():  # chats name their corpora: they follow the rename
            names = json.loads(chat["corpora"] or "[]")
            if name in names:
                db["chats"].update(chat["id"], {"corpora": json.dumps([new_name if n == name else n for n in names])})


def delete_corpus(db, corpus_id: int) -> None:
    """Forget a corpus and everything recorded about it, chats with it included (its folder is untouched; the data files the
    app made for it are removed by `engine.training.pipeline.remove_corpus`)."""
    name = db["corpora"].get(corpus_id)["name"]
    with db.atomic():
        for chat in db["chats"].rows_where():
            if name in json.loads(chat["corpora"] or "[]"):  # its answers quote the corpus
                db.execute("DELETE FROM messages WHERE chat_id = ?", [chat["id"]])
                db.execute("DELETE FROM chats WHERE id = ?", [chat["id"]])
        version_ids = [v["id"] for v in db["versions"].rows_where("corpus_id = ?", [corpus_id])]
        run_ids = [r["id"] for r in db["runs"].rows_where("corpus_id = ?", [corpus_id])]
        for run_id in run_ids:
            db.execute("DELETE FROM run_metrics WHERE run_id = ?", [run_id])
        db.execute("DELETE FROM runs WHERE corpus_id = ?", [corpus_id])
        for version_id in version_ids:
            db.execute("DELETE FROM version_files WHERE version_id = ?", [version_id])
        db.execute("DELETE FROM versions WHERE corpus_id = ?", [corpus_id])
        db.execute("DELETE FROM files WHERE corpus_id = ?", [corpus_id])
        db.execute("DELETE FROM events WHERE corpus_id = ?", [corpus_id])
        db.execute("DELETE FROM corpora WHERE id = ?", [corpus_id])
        db.execute("DELETE FROM passages WHERE sha256 NOT IN (SELECT sha256 FROM version_files)")
        db.execute("DELETE FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM version_files)")


def scrub_deleted_text(db, attempts: int = 5) -> bool:
    """After a removal: merge the full-text index's segments (older ones keep a removed text's words) and
    fold the write-ahead log into the database (it keeps pages as they were before the delete overwrote
    them). Another process reading the registry can hold the log back; returns whether both were done."""
    optimized = False
    for attempt in range(attempts):
        try:
            if not optimized:  # once: only the log may need a retry
                db.execute("INSERT INTO passages_fts(passages_fts) VALUES('optimize')")
                optimized = True
            if not db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                return True
        except sqlite3.OperationalError:
            pass
        time.sleep(0.2 * (attempt + 1))
    return False


# -- files catalog ---------------------------------------------------------------------------------

def file_catalog(db, corpus_id: int) -> dict[str, dict]:
    """The last scan's record of every file, keyed by relative path."""
    return {r["path"]: r for r in db["files"].rows_where("corpus_id = ?", [corpus_id])}


def sync_file_catalog(db, corpus_id: int, rows: Iterable[dict], catalog: dict[str, dict]) -> int:
    """Make the corpus's file catalog `rows`, writing only what differs from `catalog` (the stored one):
    an unchanged rescan writes nothing. Returns the number of rows written or deleted."""
    now, updated, added, seen = time.time(), [], [], set()
    for row in rows:
        seen.add(row["path"])
        old = catalog.get(row["path"])
        if old is None:
            added.append({**row, "corpus_id": corpus_id, "updated": now})
        elif any(old.get(k) != v for k, v in row.items()):
            updated.append({**row, "corpus_id": corpus_id, "updated": now, "id": old["id"]})
    gone = [old["id"] for path, old in catalog.items() if path not in seen]
    for i in range(0, len(gone), 500):
        batch = gone[i:i + 500]
        db.execute(f"DELETE FROM files WHERE id IN ({','.join('?' * len(batch))})", batch)
    if updated:
        db["files"].upsert_all(updated, pk="id", batch_size=1000)
    if added:
        db["files"].insert_all(added, batch_size=1000)
    return len(updated) + len(added) + len(gone)


def missing_blobs(db, shas: Iterable[str]) -> set[str]:
    """Those of `shas` whose text the registry does not hold."""
    wanted, held = sorted(set(shas)), set()
    for i in range(0, len(wanted), 500):
        batch = wanted[i:i + 500]
        held.update(r[0] for r in db.execute(
            f"SELECT sha256 FROM blobs WHERE sha256 IN ({','.join('?' * len(batch))})", batch).fetchall())
    return set(wanted) - held


def store_blobs(db, texts: dict[str, str]) -> None:
    """Content-addressed file texts (sha256 -> text), so every version can be rebuilt exactly."""
    db["blobs"].insert_all(({"sha256": h, "text": t} for h, t in texts.items()), ignore=True, batch_size=200)


def blob_text(db, sha256: str) -> str:
    row = db.execute("SELECT text FROM blobs WHERE sha256 = ?", [sha256]).fetchone()
    if row is None:
        raise UserError(f"the registry lost the text of a file (sha256 {sha256[:12]}); re-ingest the folder")
    return row[0]


# -- versions --------------------------------------------------------------------------------------

def list_versions(db, corpus_id: int) -> list[dict]:
    return list(db["versions"].rows_where("corpus_id = ?", [corpus_id], order_by="number"))


def latest_version(db, corpus_id: int) -> dict | None:
    rows = list(db["versions"].rows_where("corpus_id = ?", [corpus_id], order_by="number desc", limit=1))
    return rows[0] if rows else None


def get_version(db, corpus: dict, number: int | None = None) -> dict:
    """Version `number` of the corpus, or the current one (else the latest)."""
    if number is None:
        number = corpus.get("current_version")
        if number is None:
            latest = latest_version(db, corpus["id"])
            if latest is None:
                raise UserError(f"corpus {corpus['name']!r} has no version yet; run `cartridge ingest`")
            return latest
    rows = list(db["versions"].rows_where("corpus_id = ? AND number = ?", [corpus["id"], number]))
    if not rows:
        raise UserError(f"corpus {corpus['name']!r} has no version {number}")
    return rows[0]


def create_version(db, corpus_id: int, manifest_hash: str, files: list[dict]) -> dict:
    """Record a new version whose manifest is `files` ({path, sha256, tokens})."""
    latest = latest_version(db, corpus_id)
    number = (latest["number"] + 1) if latest else 1
    version_id = db["versions"].insert(
        {"corpus_id": corpus_id, "number": number, "manifest_hash": manifest_hash, "files": len(files),
         "tokens": sum(f["tokens"] for f in files), "status": "scanned", "created": time.time(),
         "cartridge": None, "error": None}
    ).last_pk
    db["version_files"].insert_all(({**f, "version_id": version_id} for f in files), batch_size=1000)
    return db["versions"].get(version_id)


def version_files(db, version_id: int) -> list[dict]:
    return list(db["version_files"].rows_where("version_id = ?", [version_id], order_by="path"))


def update_version(db, version_id: int, **fields) -> None:
    db["versions"].update(version_id, fields)


def set_current_version(db, corpus: dict, number: int) -> None:
    version = get_version(db, corpus, number)
    if version["status"] != "ready":
        raise UserError(f"version {number} of {corpus['name']!r} has no trained cartridge (status {version['status']})")
    update_corpus(db, corpus["id"], current_version=number)


# -- training runs ---------------------------------------------------------------------------------

def start_run(db, corpus_id: int, version_id: int, config: dict, *, pid: int, pid_started: float | None,
              resume_run: int | None = None) -> int:
    """Check that the corpus has no running run and mark a new (or resumed) run running, as one
    exclusive transaction: of two processes starting at once, one gets the run, the other a UserError."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")  # takes the write lock before the check, so no one can slip in between
    try:
        busy = conn.execute("SELECT id FROM runs WHERE corpus_id = ? AND status = 'running'", [corpus_id]).fetchone()
        if busy:
            raise UserError(f"this corpus is already training (run {busy[0]})")
        if resume_run is None:
            cursor = conn.execute(
                "INSERT INTO runs (corpus_id, version_id, status, config, started, pid, pid_started) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                [corpus_id, version_id, json.dumps(config), time.time(), pid, pid_started])
            run_id = cursor.lastrowid
        else:
            conn.execute("UPDATE runs SET status = 'running', pid = ?, pid_started = ?, finished = NULL, error = NULL "
                         "WHERE id = ?", [pid, pid_started, resume_run])
            run_id = resume_run
        conn.execute("COMMIT")
        return run_id
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def finish_run(db, run_id: int, status: str, *, error: str | None = None, cartridge: str | None = None,
               summary: dict | None = None) -> None:
    db["runs"].update(run_id, {"status": status, "finished": time.time(), "error": error, "cartridge": cartridge,
                               "summary": json.dumps(summary) if summary is not None else None})


def update_run_config(db, run_id: int, config: dict) -> None:
    db["runs"].update(run_id, {"config": json.dumps(config)})


def get_run(db, run_id: int) -> dict:
    return db["runs"].get(run_id)


def list_runs(db, corpus_id: int | None = None, status: str | None = None) -> list[dict]:
    clauses, args = [], []
    if corpus_id is not None:
        clauses.append("corpus_id = ?")
        args.append(corpus_id)
    if status is not None:
        clauses.append("status = ?")
        args.append(status)
    return list(db["runs"].rows_where(" AND ".join(clauses) or None, args, order_by="id"))


def add_metric(db, run_id: int, phase: str, step: int, *, loss: float | None = None,
               tokens_per_s: float | None = None, elapsed_s: float | None = None, data: dict | None = None) -> None:
    db["run_metrics"].insert({"run_id": run_id, "phase": phase, "step": step, "loss": loss,
                              "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s,
                              "data": json.dumps(data) if data else None})


def run_metrics(db, run_id: int, phase: str | None = None) -> list[dict]:
    if phase is None:
        return list(db["run_metrics"].rows_where("run_id = ?", [run_id], order_by="rowid"))
    return list(db["run_metrics"].rows_where("run_id = ? AND phase = ?", [run_id, phase], order_by="rowid"))


# -- chats -----------------------------------------------------------------------------------------

def create_chat(db, title: str, corpora: list[str], mode: str) -> int:
    now = time.time()
    return db["chats"].insert({"title": title, "created": now, "updated": now, "corpora": json.dumps(corpora),
                               "mode": mode}).last_pk


def add_chat_corpora(db, chat_id: int, corpora: list[str]) -> None:
    """Record that the chat now also answers from `corpora`, so that removing any of them removes the chat."""
    names = get_chat(db, chat_id)["corpora"]
    added = [n for n in corpora if n not in names]
    if added:
        db["chats"].update(chat_id, {"corpora": json.dumps(names + added)})


def add_message(db, chat_id: int, role: str, content: str, meta: dict | None = None) -> int:
    now = time.time()
    with db.atomic():
        message_id = db["messages"].insert({"chat_id": chat_id, "role": role, "content": content, "created": now,
                                            "meta": json.dumps(meta or {})}).last_pk
        db["chats"].update(chat_id, {"updated": now})
    return message_id


def list_chats(db) -> list[dict]:
    rows = list(db["chats"].rows_where(order_by="updated desc"))
    for row in rows:
        row["corpora"] = json.loads(row["corpora"] or "[]")
    return rows


def get_chat(db, chat_id: int) -> dict:
    try:
        chat = db["chats"].get(chat_id)
    except sqlite_utils.db.NotFoundError:
        raise UserError(f"no chat with id {chat_id}") from None
    chat["corpora"] = json.loads(chat["corpora"] or "[]")
    chat["messages"] = [{**m, "meta": json.loads(m["meta"] or "{}")}
                        for m in db["messages"].rows_where("chat_id = ?", [chat_id], order_by="id")]
    return chat


def rename_chat(db, chat_id: int, title: str) -> None:
    get_chat(db, chat_id)
    db["chats"].update(chat_id, {"title": title})


def delete_chat(db, chat_id: int) -> None:
    with db.atomic():
        db.execute("DELETE FROM messages WHERE chat_id = ?", [chat_id])
        db.execute("DELETE FROM chats WHERE id = ?", [chat_id])


def delete_last_messages(db, chat_id: int, count: int) -> None:
    ids = [m["id"] for m in db["messages"].rows_where("chat_id = ?", [chat_id], order_by="id desc", limit=count)]
    with db.atomic():
        for message_id in ids:
            db.execute("DELETE FROM messages WHERE id = ?", [message_id])


# -- events ----------------------------------------------------------------------------------------

def add_event(db, corpus_id: int | None, kind: str, message: str, data: dict | None = None) -> None:
    db["events"].insert({"corpus_id": corpus_id, "kind": kind, "message": message, "created": time.time(),
                         "data": json.dumps(data) if data else None})


def list_events(db, corpus_id: int | None = None, limit: int = 100) -> list[dict]:
    where, args = ("corpus_id = ?", [corpus_id]) if corpus_id is not None else (None, [])
    return list(db["events"].rows_where(where, args, order_by="id desc", limit=limit))
