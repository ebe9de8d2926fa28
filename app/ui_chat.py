"""Chat tab: one or several corpora (composed cartridges) or a comparison mode, streamed answers, saved chats."""

from __future__ import annotations

import html
import queue as queues
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from app.ui_common import corpus_names, guarded, keep, open_db, parse_version, version_choices, when
from engine.store import library, registry
from engine.errors import UserError

MODES = [("Auto", "auto"), ("Cartridge", "cartridge"), ("Cartridge + retrieved passages", "cartridge+rag"),
         ("Retrieved passages (rag)", "rag"), ("Whole folder in context (icl)", "icl"), ("No corpus (none)", "none")]
EXPORT_DIR = Path(tempfile.mkdtemp(prefix="cartridge-chats-"))
STREAM_EVERY_S = 0.08


def display_message(message: dict) -> dict:
    """A stored message as the Chatbot shows it: answers carry a line saying what answered and how fast."""
    content = message["content"]
    if message["role"] == "assistant":
        footer = library.answer_footer(message.get("meta") or {})
        if not content.strip():
            content = "*(stopped before the first word)*"
        if footer:
            content = f'{content}\n\n<span class="cd-answer-meta">{html.escape(footer)}</span>'
    return {"role": message["role"], "content": content}


def chat_display(chat: dict | None) -> list[dict]:
    return [display_message(m) for m in chat["messages"]] if chat else []


def chat_choices() -> list[tuple[str, int]]:
    with open_db() as db:
        return [(f"{c['title']} · {when(c['updated'])}", c["id"]) for c in registry.list_chats(db)]


def _last_answer(chat: dict) -> dict | None:
    return next((m["meta"] for m in reversed(chat["messages"]) if m["role"] == "assistant" and m["meta"].get("mode")),
                None)


def answered_from(chat: dict) -> list[str]:
    """The corpora, by their names now, that a chat's last answer came from (renames followed by uid); else,
    or when one of them is gone, every corpus the chat used that still exists."""
    with open_db() as db:
        corpora = registry.list_corpora(db)
    by_uid, names = {c["uid"]: c["name"] for c in corpora}, [c["name"] for c in corpora]
    last = _last_answer(chat)
    if last is not None:
        # answers saved before replies recorded uids name their corpus only
        answered = [by_uid.get(v["uid"]) if "uid" in v else v["corpus"] for v in last.get("versions") or []]
        if all(n in names for n in answered):
            return answered
    return keep(chat["corpora"], names)


def export_path(chat: dict) -> str:
    path = EXPORT_DIR / library.export_name(chat)
    path.write_text(library.chat_markdown(chat), encoding="utf-8")
    return str(path)


def _chat_id(value) -> int | None:
    try:
        return int(value) if value not in (None, "", 0) else None
    except (TypeError, ValueError):
        return None


def cartridge_card(names: list[str], version: int | None) -> str:
    """What answers: per corpus, the version in use, when its cartridge was trained, its held-out score and
    the files it covers."""
    if not names:
        return "*Pick a corpus to chat with.*"
    from engine.serve.inference import resolve

    lines = []
    with open_db() as db:
        for name in names:
            try:  # the version chat answers with, as chat picks it
                target = resolve(db, [name], version=version if len(names) == 1 else None, mode="cartridge")
            except UserError as exc:
                lines.append(f"**{html.escape(name)}**: {html.escape(str(exc))}")
                continue
            corpus, row = target.corpora[0], target.versions[0]
            run = next((r for r in reversed(registry.list_runs(db, corpus["id"]))
                        if r["version_id"] == row["id"] and r["status"] == "done"), None)
            files = [f["path"] for f in registry.version_files(db, row["id"])]
            shown = ", ".join(html.escape(f) for f in files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
            score = f" · held-out score **{row['heldout']:.0%}**" if row.get("heldout") is not None else ""
            trained = f" · trained {when(run['finished'])}" if run and run.get("finished") else ""
            beyond = "" if library.icl_fits(int(row["tokens"] or 0)) else (
                "\n\nLonger than the model's context: *Auto* answers with the cartridge and retrieved passages, "
                "which answer its facts best.")
            lines.append(f"**{html.escape(name)}** v{row['number']}{trained}{score} · {row['tokens']:,} tokens in "
                         f"{len(files)} file{'s' if len(files) != 1 else ''}: {shown}{beyond}")
    return "\n\n".join(lines)


class ChatBackends:
    """Loaded chat backends, keyed by what they answer with; loading takes seconds, so keep a few."""

    def __init__(self, size: int = 3):
        self.size = size
        self._items: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self.generate_lock = threading.Lock()  # one generation at a time: they share the model

    def get(self, corpora: list[str], version: int | None, mode: str):
        from engine.serve import inference
        from engine.cartridge.format import content_key

        with open_db() as db:
            target = inference.resolve(db, corpora, version=version, mode=mode)
            # uids and manifests too: a name can be renamed away or reused by another folder
            key = (tuple(corpora), tuple(c["uid"] for c in target.corpora),
                   tuple((v["number"], v["manifest_hash"]) for v in target.versions), mode,
                   tuple(content_key(f) for f in target.cartridge_folders), target.model_spec)
            with self._lock:
                backend = self._items.pop(key, None)
                if backend is not None and not getattr(getattr(backend, "llama", None), "alive", True):
                    backend = None  # its llama.cpp worker died: the next message gets a new one
                if backend is None:
                    backend = inference.open_chat(db, corpora, version=version, mode=mode)
                self._items[key] = backend  # most recently used last
                while len(self._items) > self.size:
                    self._items.pop(next(iter(self._items)))
        return backend

    def forget(self, corpus: str) -> None:
        with self._lock:
            for key in [k for k in self._items if corpus in k[0]]:
                self._items.pop(key)


def build(ctx) -> dict:
    backends: ChatBackends = ctx.backends
    stops: dict[str, threading.Event] = {}

    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=260):
            with gr.Group():
                corpora = gr.Dropdown(allow_custom_value=True, label="Corpora", choices=[], multiselect=True,
                                      elem_id="chat-corpora", info="several corpora: their cartridges are composed")
                version = gr.Dropdown(allow_custom_value=True, label="Version", choices=[("current", "")], value="",
                                      info="pick an earlier trained version (one corpus)")
                mode = gr.Radio(MODES, value="auto", label="Answer with", elem_id="chat-mode",
                                info="Auto: the cartridge, with retrieved passages for a folder longer than the "
                                     "model's context")
            card = gr.Markdown("*Pick a corpus to chat with.*", elem_id="chat-cartridge", elem_classes="cd-note")
            with gr.Accordion("Generation", open=False):
                max_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max answer tokens")
                temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            gr.Markdown("### Saved chats")
            with gr.Group():
                chat_pick = gr.Dropdown(allow_custom_value=True, label="Open a chat", choices=[], value=None,
                                        elem_id="chat-pick")
                title = gr.Textbox(label="Title", placeholder="open or start a chat", elem_id="chat-title")
            with gr.Row():
                new_chat = gr.Button("+ New chat", size="sm", min_width=90)
                rename = gr.Button("Rename", size="sm", min_width=80)
                delete = gr.Button("Delete…", size="sm", variant="stop", min_width=80)
            export = gr.DownloadButton("Export as Markdown", value=None, size="sm", interactive=False)
            with gr.Row(visible=False) as confirm_row:
                confirm_yes = gr.Button("Yes, delete this chat", variant="stop", size="sm")
                confirm_no = gr.Button("Keep it", size="sm")
        with gr.Column(scale=7):
            chatbot = gr.Chatbot(label="Chat", height=520, buttons=["copy", "copy_all"], elem_id="chatbot",
                                 placeholder="**Ask your folder anything.**<br>Answers come from the model plus the "
                                             "corpus's cartridge: no retrieval, no long prompt.")
            with gr.Row(equal_height=True):
                message = gr.Textbox(placeholder="Ask a question about your folder…", show_label=False, scale=8,
                                     lines=1, max_lines=6, elem_id="chat-input", submit_btn=False)
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send-btn")
            with gr.Row():
                stop = gr.Button("■ Stop", size="sm", elem_id="stop-btn")
                regenerate = gr.Button("↻ Regenerate", size="sm", elem_id="regen-btn")
    chat_id = gr.Number(value=None, visible=False, precision=0)

    # -- streaming --

    def _stream(db_chat: dict | None, history: list[dict], shown: list[dict], corpora_, version_, mode_, max_new,
                temp, session: str, *, question: str | None = None, replace_last: bool = False):
        """Yield (chatbot, chat_id, message box, chat list, export, title) while the answer streams."""
        names = list(corpora_ or [])
        if mode_ != "none" and not names:
            raise UserError("pick at least one corpus (or answer with no corpus)")
        number = parse_version(version_) if len(names) == 1 else None
        if mode_ == "auto":  # chosen when the question is sent: the corpora may have changed since
            from engine.serve.inference import default_mode

            with open_db() as db:
                mode_ = default_mode(db, names, version=number)
        pending = shown + [{"role": "assistant", "content": "…"}]
        yield pending, gr.skip(), "", gr.skip(), gr.skip(), gr.skip()
        try:
            backend = backends.get(names if mode_ != "none" else [], number, mode_)
        except Exception:
            yield chat_display(db_chat), gr.skip(), question or "", gr.skip(), gr.skip(), gr.skip()
            raise
        used = names if mode_ != "none" else []  # the corpora this answer comes from
        with open_db() as db:
            if db_chat is None:
                cid = registry.create_chat(db, library.chat_title(question), used, mode_)
            else:
                cid = db_chat["id"]
                registry.add_chat_corpora(db, cid, used)
            if question is not None:
                registry.add_message(db, cid, "user", question)
        stop_event = stops.setdefault(session, threading.Event())
        stop_event.clear()
        pieces: queues.Queue = queues.Queue()
        result: dict = {}

        def work():
            """Generate and save in this thread, so an answer is kept even if the page goes away meanwhile."""
            try:
                with backends.generate_lock:
                    reply = backend.reply(history, max_new_tokens=int(max_new), temperature=float(temp),
                                          on_text=pieces.put, should_stop=stop_event.is_set)
                meta = {"mode": reply.mode, "versions": reply.versions, "ttft_s": reply.ttft_s,
                        "tokens_per_s": reply.tokens_per_s, "kv_bytes": reply.kv_bytes,
                        "stopped": stop_event.is_set(), "sources": reply.sources}
                with open_db() as db:
                    if replace_last:
                        registry.delete_last_messages(db, cid, 1)
                    registry.add_message(db, cid, "assistant", reply.answer, meta)
                    result["chat"] = registry.get_chat(db, cid)
            except BaseException as exc:  # noqa: BLE001 - handed to the page below
                result["error"] = exc
                with open_db() as db:
                    if db_chat is None:  # the chat was made for this question: nothing of it is kept
                        registry.delete_chat(db, cid)
                    elif question is not None:
                        registry.delete_last_messages(db, cid, 1)
            finally:
                pieces.put(None)

        threading.Thread(target=work, name="chat-reply", daemon=True).start()
        text, shown_at = "", time.monotonic()
        while (piece := pieces.get()) is not None:
            text += piece
            if time.monotonic() - shown_at >= STREAM_EVERY_S:  # the page gets the text a few times a second
                pending[-1] = {"role": "assistant", "content": text}
                yield pending, cid, gr.skip(), gr.skip(), gr.skip(), gr.skip()
                shown_at = time.monotonic()
        if "error" in result:
            if db_chat is None:
                yield [], None, question or "", gr.skip(), gr.skip(), gr.skip()
            else:
                with open_db() as db:
                    chat = registry.get_chat(db, cid)
                yield chat_display(chat), cid, question or "", gr.skip(), gr.skip(), gr.skip()
            raise result["error"]
        chat = result["chat"]
        choices = chat_choices()
        yield (chat_display(chat), cid, gr.skip(), gr.update(choices=choices, value=cid),
               gr.update(value=export_path(chat), interactive=True), chat["title"])

    @guarded
    def do_send(text, cid, corpora_, version_, mode_, max_new, temp, request: gr.Request):
        text = (text or "").strip()
        if not text:
            raise UserError("type a question first")
        cid = _chat_id(cid)
        with open_db() as db:
            chat = registry.get_chat(db, cid) if cid else None
        history = [{"role": m["role"], "content": m["content"]} for m in (chat["messages"] if chat else [])]
        history.append({"role": "user", "content": text})
        shown = chat_display(chat) + [{"role": "user", "content": text}]
        yield from _stream(chat, history, shown, corpora_, version_, mode_, max_new, temp,
                           request.session_hash if request else "", question=text)

    @guarded
    def do_regenerate(cid, corpora_, version_, mode_, max_new, temp, request: gr.Request):
        cid = _chat_id(cid)
        if not cid:
            raise UserError("nothing to regenerate yet: ask a question first")
        with open_db() as db:
            chat = registry.get_chat(db, cid)
        messages = chat["messages"]
        replace = bool(messages) and messages[-1]["role"] == "assistant"
        keep_msgs = messages[:-1] if replace else messages
        if not keep_msgs or keep_msgs[-1]["role"] != "user":
            raise UserError("nothing to regenerate yet: ask a question first")
        history = [{"role": m["role"], "content": m["content"]} for m in keep_msgs]
        shown = [display_message(m) for m in keep_msgs]
        yield from _stream(chat, history, shown, corpora_, version_, mode_, max_new, temp,
                           request.session_hash if request else "", replace_last=replace)

    def do_stop(request: gr.Request):
        event = stops.get(request.session_hash if request else "")
        if event is not None:
            event.set()

    # -- saved chats --

    @guarded
    def do_open(cid):
        cid = _chat_id(cid)
        if not cid:
            return [], None, "", gr.skip(), gr.skip(), gr.update(value=None, interactive=False)
        with open_db() as db:
            chat = registry.get_chat(db, cid)
        names = corpus_names()
        # The chat goes on as its last answer was made.
        last = _last_answer(chat)
        mode_ = last["mode"] if last else chat["mode"]
        return (chat_display(chat), cid, chat["title"], gr.update(choices=names, value=answered_from(chat)),
                mode_, gr.update(value=export_path(chat), interactive=True))

    def do_new():
        return [], None, "", gr.update(value=None), gr.update(value=None, interactive=False), ""

    @guarded
    def do_rename(cid, new_title):
        cid, new_title = _chat_id(cid), (new_title or "").strip()
        if not cid or not new_title:
            raise UserError("open a chat and type its new title")
        with open_db() as db:
            registry.rename_chat(db, cid, new_title)
            chat = registry.get_chat(db, cid)
        return gr.update(choices=chat_choices(), value=cid), gr.update(value=export_path(chat))

    @guarded
    def ask_delete(cid):
        if not _chat_id(cid):
            raise UserError("open a chat first")
        return gr.update(visible=True)

    @guarded
    def do_delete(cid):
        cid = _chat_id(cid)
        if cid:
            with open_db() as db:
                registry.delete_chat(db, cid)
        return (gr.update(choices=chat_choices(), value=None), [], None, "", gr.update(visible=False),
                gr.update(value=None, interactive=False))

    @guarded
    def do_export(cid):
        cid = _chat_id(cid)
        if not cid:
            raise UserError("open a chat first")
        with open_db() as db:
            return export_path(registry.get_chat(db, cid))

    def list_chats():
        with open_db() as db:
            return [{"id": c["id"], "title": c["title"], "corpora": c["corpora"], "mode": c["mode"],
                     "updated": c["updated"]} for c in registry.list_chats(db)]

    def on_corpora(names):
        names = names or []
        if len(names) == 1:
            return gr.update(choices=version_choices(names[0], ready_only=True), value="", interactive=True)
        return gr.update(choices=[("current", "")], value="", interactive=False)

    # -- wiring --
    outputs = [chatbot, chat_id, message, chat_pick, export, title]
    inputs = [message, chat_id, corpora, version, mode, max_tokens, temperature]
    send.click(do_send, inputs, outputs, api_name="chat", concurrency_id="generate", concurrency_limit=1)
    message.submit(do_send, inputs, outputs, api_name="chat_submit", api_visibility="undocumented",
                   concurrency_id="generate", concurrency_limit=1)
    regenerate.click(do_regenerate, inputs[1:], outputs, api_name="regenerate", concurrency_id="generate",
                     concurrency_limit=1)
    stop.click(do_stop, None, None, api_name="stop", concurrency_limit=None, show_progress="hidden")
    corpora.change(on_corpora, corpora, version, api_name="chat_versions", api_visibility="undocumented")
    corpora.change(lambda n, v: cartridge_card(n or [], parse_version(v)), [corpora, version], card,
                   api_name="cartridge_card", api_visibility="undocumented", show_progress="hidden")
    version.change(lambda n, v: cartridge_card(n or [], parse_version(v)), [corpora, version], card,
                   api_visibility="undocumented", show_progress="hidden")
    chat_pick.input(do_open, chat_pick, [chatbot, chat_id, title, corpora, mode, export], api_name="open_chat")
    new_chat.click(do_new, None, [chatbot, chat_id, title, chat_pick, export, message], api_name="new_chat")
    chatbot.clear(do_new, None, [chatbot, chat_id, title, chat_pick, export, message], api_name="clear_chat",
                  api_visibility="undocumented")  # the chat stays saved; the page starts a new one
    rename.click(do_rename, [chat_id, title], [chat_pick, export], api_name="rename_chat")
    delete.click(ask_delete, chat_id, confirm_row, api_name="ask_delete_chat", api_visibility="undocumented")
    confirm_no.click(lambda: gr.update(visible=False), None, confirm_row, api_name="keep_chat",
                     api_visibility="undocumented")
    confirm_yes.click(do_delete, chat_id, [chat_pick, chatbot, chat_id, title, confirm_row, export],
                      api_name="delete_chat")
    hidden_file = gr.File(visible=False)
    hidden_list = gr.JSON(visible=False)
    gr.Button(visible=False).click(do_export, chat_id, hidden_file, api_name="export_chat")
    gr.Button(visible=False).click(list_chats, None, hidden_list, api_name="list_chats")

    def refresh(current_corpora, current_chat):
        """Lists brought up to date. An open chat that was deleted (with its corpus) gives way to a new one;
        a picked corpus that was renamed is replaced by the open chat's own record of its corpora."""
        names, choices, cid = corpus_names(), chat_choices(), _chat_id(current_chat)
        chat = None
        if cid and keep(cid, choices) is not None:
            with open_db() as db:
                chat = registry.get_chat(db, cid)
        picked = current_corpora or []
        chosen = keep(picked, names)
        if chat is not None and len(chosen) < len(picked):
            chosen = answered_from(chat)
        if not chosen and names:
            chosen = [names[0]]
        lists = (gr.update(choices=names, value=chosen), gr.update(choices=choices, value=cid if chat else None))
        if cid and chat is None:
            return (*lists, [], None, "", gr.update(value=None, interactive=False))
        return (*lists, gr.skip(), gr.skip(), gr.skip(), gr.skip())

    return {"corpora": corpora, "chat_pick": chat_pick, "chat_id": chat_id, "refresh": refresh,
            "refresh_outputs": [corpora, chat_pick, chatbot, chat_id, title, export]}
