"""The desktop UI served in-process and driven through gradio_client against the real engine and registry."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import ASSETS, ROOT, served_app, write

TINY = {"p": 8, "conversations": 4, "steps": 2, "batch_size": 2, "chunk_tokens": 96}


@contextmanager
def running_app():
    with served_app(7900) as (demo, url):
        yield demo, Client(url.rstrip("/"), verbose=False)


def train_args(corpus, *, preset="demo", model="", resume=False, **settings):
    s = {**TINY, **settings}
    return (corpus, "", preset, s["p"], s["conversations"], s["steps"], s["batch_size"], s["chunk_tokens"], None,
            model, "auto", resume)


def text_of(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def rows_of(frame) -> list[list]:
    """The rows of a Dataframe output (a plain value or an update)."""
    return (frame.get("value") or frame)["data"]


def app_error(client, *args, api_name) -> str:
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert "Traceback" not in message and message.strip(), message
    return message


def test_api_endpoints_and_readable_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    binary_only = tmp_path / "bin"
    write(binary_only, "blob.bin", b"\x00\x01\x02\x03" * 64)
    with running_app() as (demo, client):
        names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
        assert {"/ingest", "/train", "/chat", "/cancel", "/poll_jobs", "/evaluate", "/rename_corpus", "/remove_corpus",
                "/make_current", "/open_chat", "/rename_chat", "/delete_chat", "/export_chat", "/regenerate",
                "/stop"} <= names

        assert "no such folder" in app_error(client, str(tmp_path / "missing"), "", "", api_name="/ingest")
        assert "empty" in app_error(client, str(empty), "", "", api_name="/ingest")
        assert "no readable text files" in app_error(client, str(binary_only), "", "", api_name="/ingest")
        assert "type the path" in app_error(client, "", "", "", api_name="/ingest")
        assert "no corpus named 'ghost'" in app_error(client, *train_args("ghost"), api_name="/train")
        assert "pick at least one corpus" in app_error(client, "hello", None, [], "", "cartridge", 32, 0.0,
                                                       api_name="/chat")
        assert "no corpus named 'ghost'" in app_error(client, "hello", None, ["ghost"], "", "cartridge", 32, 0.0,
                                                      api_name="/chat")
        assert "upload a QA file" in app_error(client, "ghost", "", None, ["none"], api_name="/evaluate")
        assert "no training job" in app_error(client, api_name="/cancel")

        client.predict(str(ASSETS / "sample"), "", "", api_name="/ingest")
        # settings are checked before a job exists
        assert "less than minimum value 2" in app_error(client, *train_args("sample", p=1), api_name="/train")
        bad_version = ("sample", "9") + train_args("sample")[2:]
        assert "has no version 9" in app_error(client, *bad_version, api_name="/train")
        assert not demo.training_queue.jobs()
        # a chat in cartridge mode before any training says what to do
        message = app_error(client, "hello", None, ["sample"], "", "cartridge", 32, 0.0, api_name="/chat")
        assert "no trained cartridge yet" in message and "Train tab" in message
        # nothing was saved for the failed turns
        assert client.predict(api_name="/list_chats") == []


def test_ingest_shows_manifest_and_library(tmp_path):
    root = tmp_path / "vault"
    write(root, "notes/one.md", "The lighthouse keeper writes the weather down at dawn.\n")
    write(root, "notes/two.md", "Fog horns sound every thirty seconds in fog.\n")
    write(root, ".env", "TOKEN=secret\n")
    write(root, "pic.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    write(root, "drafts/skip.md", "not this one\n")
    with running_app() as (demo, client):
        summary, manifest, doc, *_ = client.predict(str(root), "My vault", "drafts/", api_name="/ingest")
        assert "My vault — new version v1" in summary and "2 files included" in summary
        rows = {r[0]: r for r in rows_of(manifest)}
        assert rows["notes/one.md"][1] == "included" and rows["notes/one.md"][2] > 0
        assert rows[".env"][1:] == ["skipped", "", "secret"]
        assert rows["pic.png"][1] == "skipped" and rows["pic.png"][3]
        assert rows["drafts/"][3] == "ignored"
        assert doc["corpus"]["name"] == "My vault" and doc["version"] == 1 and doc["changed"] is True
        assert {f["file"] for f in doc["files"]} >= {"notes/one.md", ".env"}

        table = client.predict(None, api_name="/refresh_library")[0]
        [row] = rows_of(table)
        assert row[0] == "My vault" and row[1] == "not trained yet" and row[3] == 1 and row[4] == 2
        assert row[-1] == str(root.resolve())

        # unchanged folder: no new version; a changed file: a new one
        summary, *_ = client.predict(str(root), "", "", api_name="/ingest")
        assert "unchanged since v1" in summary
        write(root, "notes/three.md", "A third note.\n")
        summary, *_ = client.predict(str(root), "", "", api_name="/ingest")
        assert "new version v2" in summary
        versions = rows_of(client.predict("My vault", api_name="/corpus_versions")[0])
        assert [v[0] for v in versions] == ["v2", "v1"]
        summary = client.predict("My vault", api_name="/manifest")[0]
        assert "3 files included" in summary
        chart = client.predict("My vault", api_name="/files_chart")  # the same files as a picture
        bars = {(r[0], r[1]): r[2] for r in (chart.get("value") or chart)["data"]}
        assert bars[("notes/", "included")] == 3 and bars[("(top level)", "skipped")] == 2

        # a version without a cartridge cannot become current
        assert "no trained cartridge" in app_error(client, "My vault", "1", api_name="/make_current")
        # folder watch on and off (a retrain it may have queued meanwhile is cancelled)
        table, _, status = client.predict("My vault", True, api_name="/watch_corpus")
        assert "· watched" in rows_of(table)[0][1] and status.startswith("Watching")
        table, _, status = client.predict("My vault", False, api_name="/watch_corpus")
        assert "watched" not in rows_of(table)[0][1] and status.startswith("Not watched")
        for job in demo.training_queue.jobs():
            demo.training_queue.cancel(job.id)
            demo.training_queue.wait(job.id, timeout=120)

        # rename, then remove (the folder stays on disk)
        table = client.predict("My vault", "Vault", api_name="/rename_corpus")[0]
        assert rows_of(table)[0][0] == "Vault"
        table = client.predict("Vault", api_name="/remove_corpus")[0]
        assert rows_of(table) == []
        assert (root / "notes" / "one.md").is_file()


def test_large_folder_warning_and_chat_mode(tmp_path):
    from engine.serve.inference import default_mode
    from engine.store import registry

    root = tmp_path / "big"
    words = " ".join(f"word{i}" for i in range(4000))
    for n in range(40):
        write(root, f"part{n:02d}.md", f"# Part {n}\n{words}\n")
    write(tmp_path / "club", "boats.md", "The club's dinghy is moored at pontoon C, berth 14.\n")
    with running_app() as (demo, client):
        summary, *_ = client.predict(str(root), "", "", api_name="/ingest")
        client.predict(str(tmp_path / "club"), "", "", api_name="/ingest")
        # Auto, chat's default mode: retrieved passages beside the cartridge for a folder beyond the context.
        db = registry.open_registry()
        assert default_mode(db, ["club"]) == "cartridge" and default_mode(db, ["big"]) == "cartridge+rag"
        assert default_mode(db, ["club", "big"]) == "cartridge+rag"
        assert "no trained cartridge yet" in app_error(client, "Hi", None, ["big"], "", "auto", 8, 0.0,
                                                       api_name="/chat")
    assert "far more than a cartridge trained on a CPU" in summary
    assert "does not fit the default model's context" in summary


def test_cartridge_for_another_model_is_refused(tmp_path, db):
    import torch
    from safetensors.torch import save_file

    from engine.store import registry
    from engine.cartridge.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, METADATA, WEIGHT_KEY
    from engine.corpus.ingest import ingest

    write(tmp_path / "docs", "a.md", "Some text about tides.\n")
    result = ingest(tmp_path / "docs", db=db)
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / METADATA).write_text(json.dumps({"format": FORMAT, "fingerprint": "other-model@sha256:" + "ab" * 32,
                                               "p": 4, "base_model": None}))
    (folder / ADAPTER_CONFIG).write_text("{}")
    save_file({WEIGHT_KEY: torch.zeros(4, 8)}, str(folder / ADAPTER_WEIGHTS))
    registry.update_version(db, result.version["id"], status="ready", cartridge=str(folder))
    registry.set_current_version(db, result.corpus, 1)
    with running_app() as (demo, client):
        message = app_error(client, "hi", None, ["docs"], "", "cartridge", 16, 0.0, api_name="/chat")
    assert "was made for model other-model@abababababab" in message


def test_training_failure_shows_its_error(tmp_path):
    write(tmp_path / "docs", "a.md", "Some text about tides.\n")
    with running_app() as (demo, client):
        client.predict(str(tmp_path / "docs"), "", "", api_name="/ingest")
        job = client.predict(*train_args("docs", model=str(tmp_path / "no-such-model")), api_name="/train")
        demo.training_queue.wait(job["id"], timeout=120)
        card, _, jobs = client.predict(api_name="/poll_jobs")
        assert "failed" in card and "cannot load model" in card
        assert rows_of(jobs)[0][2] == "failed" and "cannot load model" in rows_of(jobs)[0][-1]


def test_ingest_train_chat_history_eval(tmp_path):
    """The whole path a new user takes, on the real default model with tiny settings."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join((ASSETS / "sample_qa.jsonl").read_text().splitlines()[:2]) + "\n")
    folder = tmp_path / "sample"
    shutil.copytree(ASSETS / "sample", folder)
    with running_app() as (demo, client):
        queue = demo.training_queue
        client.predict(str(folder), "", "", api_name="/ingest")

        job = client.predict(*train_args("sample"), api_name="/train")
        assert job["corpus"] == "sample" and job["state"] in ("queued", "running")
        seen_phases = set()
        deadline = time.time() + 900
        while queue.get(job["id"]).state in ("queued", "running") and time.time() < deadline:
            seen_phases.add(queue.get(job["id"]).to_json()["phase"])
            time.sleep(0.5)
        final = queue.get(job["id"])
        assert final.state == "done", final.error
        assert {"synthesis", "training"} & seen_phases
        card, plot, jobs = client.predict(api_name="/poll_jobs")
        assert "v1 is ready" in card and "done" in card
        assert [p[0] for p in plot["data"]] == [1, 2] and all(p[1] > 0 for p in plot["data"])
        assert rows_of(jobs)[0][:3] == ["#1", "sample", "done"]

        table = client.predict(None, api_name="/refresh_library")[0]
        [row] = rows_of(table)
        assert row[0] == "sample" and row[1] == "ready" and row[2] == "v1" and row[7] == 8
        assert row[6].endswith(" MB") and row[9] != "–"  # trained when
        card = client.predict(["sample"], "", api_name="/cartridge_card")  # what the chat answers with
        assert card.startswith("**sample** v1 · trained ") and " files: equipment.md, faq.md" in card

        # a streamed answer, saved with what answered and how fast
        streaming = client.submit("What are the opening hours on Saturday?", None, ["sample"], "", "auto", 24,
                                  0.0, api_name="/chat")
        chatbot, chat_id, *_ = streaming.result(timeout=300)
        assert len(streaming.outputs()) >= 3  # placeholder, pieces, final
        assert [m["role"] for m in chatbot] == ["user", "assistant"]
        answer = text_of(chatbot[1])
        assert "sample v1 (cartridge)" in answer and "first token" in answer and "tokens/s" in answer  # auto: it fits

        # a follow-up in the same chat, with no corpus for comparison
        chatbot, same_id, *_ = client.predict("And on Sunday?", chat_id, [], "", "none", 16, 0.0, api_name="/chat")
        assert same_id == chat_id and len(chatbot) == 4 and "no corpus (none)" in text_of(chatbot[3])

        # regenerate replaces the last answer (here with a chosen version)
        chatbot, *_ = client.predict(chat_id, ["sample"], "1", "cartridge", 16, 0.0, api_name="/regenerate")
        assert len(chatbot) == 4 and "sample v1 (cartridge)" in text_of(chatbot[3])

        # stop: the answer so far is kept and marked
        long = client.submit("Write a long story about the sea.", None, [], "", "none", 400, 0.0, api_name="/chat")
        deadline = time.time() + 120
        while len(long.outputs()) < 3 and time.time() < deadline:
            time.sleep(0.1)
        client.predict(api_name="/stop")
        chatbot, stopped_id, *_ = long.result(timeout=120)
        assert "stopped" in text_of(chatbot[1])
        client.predict(stopped_id, api_name="/delete_chat")

        # the folder changes: v2 trains in the background while chat keeps answering with v1
        write(folder, "news.md", "The makerspace now opens at 8:00 AM on Saturdays.\n")
        summary, *_ = client.predict(str(folder), "", "", api_name="/ingest")
        assert "new version v2" in summary
        assert rows_of(client.predict(None, api_name="/refresh_library")[0])[0][1] == "stale since 1 change"
        second = client.predict(*train_args("sample", conversations=6, steps=6), api_name="/train")
        chatbot, *_ = client.predict("Who runs the makerspace?", None, ["sample"], "", "cartridge", 16, 0.0,
                                     api_name="/chat")
        assert "sample v1 (cartridge)" in text_of(chatbot[1])
        assert rows_of(client.predict(None, api_name="/refresh_library")[0])[0][1] == "training"
        client.predict(api_name="/cancel")
        assert queue.wait(second["id"], timeout=300).state == "cancelled"

        # history: listed, reopened, exported, renamed, deleted
        chats = client.predict(api_name="/list_chats")
        assert [c["id"] for c in chats][-1] == chat_id and len(chats) == 2
        opened, opened_id, title, *_ = client.predict(chat_id, api_name="/open_chat")
        assert opened_id == chat_id and title == "What are the opening hours on Saturday?" and len(opened) == 4
        exported = Path(client.predict(chat_id, api_name="/export_chat"))
        text = exported.read_text()
        assert text.startswith("# What are the opening hours on Saturday?") and "**You:**" in text
        client.predict(chat_id, "Opening hours", api_name="/rename_chat")
        assert any(c["title"] == "Opening hours" for c in client.predict(api_name="/list_chats"))
        client.predict(chat_id, api_name="/delete_chat")
        remaining = [c["id"] for c in client.predict(api_name="/list_chats")]
        assert remaining and chat_id not in remaining

        # evaluation: none / icl / untrained / cartridge side by side, remembered in the library
        summary, chart, accuracy, figures, result = client.predict(
            "sample", "", handle_file(str(qa)), ["none", "icl", "init", "cartridge"], api_name="/evaluate")
        assert set(result["modes"]) == {"none", "icl", "init", "cartridge"} and result["questions"] == 2
        # The sample questions carry expected strings: every mode also answers them and is graded.
        assert result["graded"] == 2 and all(0 <= m["accuracy"] <= 1 for m in result["modes"].values())
        assert len(accuracy["data"]) == 4 and rows_of(figures)[0][1].endswith("%")
        assert [r[0] for r in rows_of(figures)] == ["none (no corpus)", "icl (folder in context)",
                                                    "untrained cartridge", "cartridge"]
        assert len(chart["data"]) == 4 and "sample v1 · 2 questions" in summary
        assert "Training moved the answer NLL" in summary
        table = client.predict(None, api_name="/refresh_library")[0]
        assert rows_of(table)[0][10].startswith("v1: NLL")


def test_a_chat_is_removed_with_every_corpus_it_answered_from(tmp_path):
    """A saved chat continued with another corpus records it, so removing that corpus removes the chat (its
    answers quote it); a no-corpus answer records none, so removing the selected corpus keeps that chat."""
    from engine.store import registry
    from engine.training.pipeline import remove_corpus

    write(tmp_path / "club", "boats.md", "The club's dinghy is moored at pontoon C, berth 14.\n")
    write(tmp_path / "garden", "shed.md", "The allotment shed keeps spades, rakes and twine.\n")
    with running_app() as (demo, client):
        for folder in ("club", "garden"):
            client.predict(str(tmp_path / folder), "", "", api_name="/ingest")
        _, chat_id, *_ = client.predict("Where is the dinghy?", None, ["club"], "", "rag", 8, 0.0, api_name="/chat")
        _, same, *_ = client.predict("What does the shed keep?", chat_id, ["garden"], "", "rag", 8, 0.0,
                                     api_name="/chat")
        _, plain, *_ = client.predict("Hello", None, ["garden"], "", "none", 8, 0.0, api_name="/chat")
        assert same == chat_id and plain != chat_id
        db = registry.open_registry()
        assert registry.get_chat(db, chat_id)["corpora"] == ["club", "garden"]
        assert registry.get_chat(db, plain)["corpora"] == []
        _, _, _, selected, mode, _ = client.predict(chat_id, api_name="/open_chat")
        assert selected["value"] == ["garden"] and mode == "rag"  # it goes on as its last answer was made
        # Renamed while the chat is open: the Chat tab picks the new name, not another folder.
        registry.rename_corpus(db, "garden", "allotment")
        corpora, pick, *_ = client.predict(["garden"], chat_id, api_name="/chat_tab")
        assert corpora["value"] == ["allotment"] and pick["value"] == chat_id
        remove_corpus(db, "allotment")
        assert [c["id"] for c in registry.list_chats(db)] == [plain]
        # Removed with its corpus while open: the Chat tab starts a new chat instead of showing the old one.
        corpora, pick, shown, open_id, title, _ = client.predict(["allotment"], chat_id, api_name="/chat_tab")
        assert corpora["value"] == ["club"] and pick["value"] is None
        assert shown == [] and open_id is None and title == ""


def test_a_first_answer_that_fails_leaves_no_empty_chat(tmp_path):
    from gradio_client.exceptions import AppError

    from engine.store import registry

    with running_app() as (demo, client):
        with pytest.raises(AppError, match="needs .* positions"):
            client.predict("word " * 8000, None, [], "", "none", 1024, 0.0, api_name="/chat")
        assert registry.list_chats(registry.open_registry()) == []


def _serve(argv, env):
    """Start `cartridge ARGV` and return (process, url) once it says where it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Cartridge Desktop: http://"):
            return proc, line.split()[2]
    _stop(proc)
    pytest.fail("the app did not start:\n" + "".join(lines))


def _stop(proc):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _get(url, seconds=120):
    deadline = time.time() + seconds
    while True:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _listening_addresses(port: int) -> list[str]:
    """IPv4 addresses listening on `port`, from /proc/net/tcp (Linux)."""
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_ui_command_serves_on_localhost_only(cartridge_home):
    from app.ports import free_port

    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home), "PYTHONPATH": str(ROOT),
           "BROWSER": "true"}  # a no-op browser for the bare command, which opens one
    port = free_port(7950)
    proc, url = _serve(["ui", "--no-browser", "--port", str(port)], env)
    try:
        assert url == f"http://127.0.0.1:{port}"
        assert "Cartridge Desktop" in _get(url + "/")
        assert _listening_addresses(port) in ([], ["127.0.0.1"])  # [] where /proc/net/tcp is not available
    finally:
        _stop(proc)

    proc, url = _serve([], env)  # no command: the app, on 7860 or the next free port
    try:
        assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) >= 7860
        assert "Cartridge Desktop" in _get(url + "/")
    finally:
        _stop(proc)


def test_ui_help_and_busy_port(cartridge_home):
    import socket

    env = {**os.environ, "CARTRIDGE_HOME": str(cartridge_home), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ui" in out.stdout
    out = subprocess.run([sys.executable, "-m", "app.cli", "ui", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--no-browser" in out.stdout and "--share" in out.stdout
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "app.cli", "ui", "--no-browser", "--port", str(busy)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: port") and "Traceback" not in out.stderr


def test_browse_falls_back_to_the_in_page_folder_browser(tmp_path, monkeypatch, cartridge_home):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for rel in ("notes/2024/march.md", "notes/ideas.md", "code/app.py", ".hidden/x.md"):
        write(tmp_path / "home", rel, "text\n")
    start = tmp_path / "home"
    with running_app() as (demo, client):
        out = client.predict(str(start), api_name="/browse_folder")
        where, listing = out[-2], out[-1]
        assert str(start.resolve()) in where and "2 folders" in where
        assert [c[1] for c in listing["choices"]] == ["code", "notes"]  # hidden folders are not offered
        out = client.predict("notes", api_name="/browse_into")  # the browser's folder is kept per session
        assert str((start / "notes").resolve()) in out[-2] and [c[1] for c in out[-1]["choices"]] == ["2024"]
        out = client.predict("2024", api_name="/browse_into")
        out = client.predict(api_name="/browse_up")
        assert f"{(start / 'notes').resolve()}**" in out[-2]
        chosen = client.predict(api_name="/browse_use")
        chosen = chosen if isinstance(chosen, str) else chosen[0]
        assert chosen == str((start / "notes").resolve())
        client.predict(chosen, "", "", api_name="/ingest")
        recent = client.predict(api_name="/recent_folders")
        assert str((start / "notes").resolve()) in [c[1] if isinstance(c, (list, tuple)) else c
                                                    for c in recent["choices"]]
