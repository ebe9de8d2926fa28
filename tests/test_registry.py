"""The registry on a real SQLite file: migrations, pragmas, all-or-nothing writes."""

import sqlite3

import pytest
import sqlite_utils

from engine.store import registry


def test_fresh_registry_has_schema_version_wal_and_foreign_keys(cartridge_home):
    db = registry.open_registry()
    assert (cartridge_home / "registry.db").is_file()
    assert registry.schema_version(db) == len(registry.MIGRATIONS) >= 3
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    for table in ["corpora", "files", "versions", "version_files", "blobs", "runs", "run_metrics", "chats",
                  "messages", "events", "_migrations"]:
        assert db[table].exists(), table
    with pytest.raises(sqlite3.IntegrityError):
        db["versions"].insert({"corpus_id": 999, "number": 1, "status": "scanned"})


def test_migrations_upgrade_an_old_database_and_keep_its_data(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    old["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    registry.MIGRATIONS[0](old)  # a database made by the first release
    old["_migrations"].insert({"name": registry.MIGRATIONS[0].__name__, "applied_at": 0.0})
    old["corpora"].insert({"name": "kept", "root": "/somewhere"})
    old.conn.close()

    db = registry.open_registry(path)
    assert registry.schema_version(db) == len(registry.MIGRATIONS)
    assert [c["name"] for c in registry.list_corpora(db)] == ["kept"]
    assert db["runs"].exists() and db["chats"].exists()
    applied = [r["name"] for r in db["_migrations"].rows_where(order_by="name")]
    assert applied == sorted(fn.__name__ for fn in registry.MIGRATIONS)
    # Opening again applies nothing twice.
    registry.open_registry(path)


def test_transaction_rolls_back_everything(db):
    with pytest.raises(RuntimeError):
        with registry.transaction(db):
            registry.create_corpus(db, "half", "/half")
            raise RuntimeError("crash mid-write")
    assert registry.list_corpora(db) == []


def test_chats_messages_and_events_roundtrip(db):
    chat_id = registry.create_chat(db, "first chat", ["notes"], "cartridge")
    registry.add_message(db, chat_id, "user", "hello")
    registry.add_message(db, chat_id, "assistant", "hi", {"ttft_s": 0.1})
    chat = registry.get_chat(db, chat_id)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][1]["meta"] == {"ttft_s": 0.1}
    registry.rename_chat(db, chat_id, "renamed")
    assert registry.list_chats(db)[0]["title"] == "renamed"
    registry.delete_chat(db, chat_id)
    assert registry.list_chats(db) == [] and db["messages"].count == 0


def test_corrupt_registry_is_a_clear_error(tmp_path):
    from engine.errors import UserError

    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="cannot open the registry"):
        registry.open_registry(path)
