"""The desktop UI: a Gradio app over the engine (library, training queue, chat, evaluation).

`build_app()` makes the Blocks (tests launch it in-process); `launch()` serves it on 127.0.0.1 and opens
the browser. One TrainingQueue per app: it runs in a background thread and outlives browser tabs, so a
page opened later shows the job that is running.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import ui_chat, ui_eval, ui_library, ui_train
from engine.errors import UserError
from app.ports import HOST, free_port, port_is_free

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def theme():
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def css() -> str:
    path = ASSETS / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


class CartridgeApp(gr.Blocks):
    """gr.Blocks whose launch() brings the app's theme and stylesheet unless told otherwise."""

    def launch(self, *args, **kwargs):
        kwargs.setdefault("theme", theme())
        kwargs.setdefault("css", css())
        kwargs.setdefault("show_error", True)
        return super().launch(*args, **kwargs)


class Context:
    """What the tabs share: the training queue and the loaded chat backends."""

    def __init__(self, queue, watcher=None):
        self.queue = queue
        self.watcher = watcher  # engine.jobs.watcher.WatchService, or None when folder watch is off
        self.backends = ui_chat.ChatBackends()

    def forget_corpus(self, name: str) -> None:
        self.backends.forget(name)


def build_app(queue=None, *, watch: bool = True) -> gr.Blocks:
    """The whole UI. `queue` is the engine's TrainingQueue (a new one when None); with `watch`, the corpora
    whose watch switch is on are watched and retrained when their folders change."""
    from engine.training import pipeline
    from engine.jobs.queue import TrainingQueue
    from app.ui_common import open_db

    with open_db() as db:  # creates the registry first; runs left 'running' by a dead process become interrupted
        pipeline.recover_interrupted(db)
    if queue is None:
        queue = TrainingQueue()
    watcher = None
    if watch:
        from engine.jobs.watcher import start_watchers

        watcher = start_watchers(queue)
    ctx = Context(queue, watcher)
    with CartridgeApp(title="Cartridge Desktop", analytics_enabled=False, fill_width=False) as demo:
        gr.HTML('<div class="cd-header"><div class="cd-logo">▣</div><div><h1>Cartridge Desktop</h1>'
                '<p>Train a small cartridge for a folder, then chat with it: fixed memory, no prefill, all local.</p>'
                '</div></div>')
        with gr.Tabs(elem_id="main-tabs") as tabs:
            with gr.Tab("Library", id="library", elem_id="tab-library") as library_tab:
                library = ui_library.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                train = ui_train.build(ctx)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat") as chat_tab:
                chat = ui_chat.build(ctx)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as eval_tab:
                evaluation = ui_eval.build(ctx)

        # Lists in each tab are refreshed when the tab is opened and when a job changes state.
        library_tab.select(library["refresh"], library["selected"], library["refresh_outputs"],
                           api_name="library_tab", api_visibility="undocumented")
        train_tab.select(train["refresh"], train["corpus"], train["corpus"], api_name="train_tab",
                         api_visibility="undocumented")
        chat_tab.select(chat["refresh"], [chat["corpora"], chat["chat_id"]], chat["refresh_outputs"],
                        api_name="chat_tab", api_visibility="undocumented")
        eval_tab.select(evaluation["refresh"], evaluation["corpus"], evaluation["corpus"], api_name="eval_tab",
                        api_visibility="undocumented")
        train["generation"].change(library["refresh"], library["selected"], library["refresh_outputs"],
                                   api_name="jobs_changed", api_visibility="undocumented", show_progress="hidden")

        def go_train(ingested):
            name = (ingested or {}).get("corpus", {}).get("name")
            return gr.Tabs(selected="train"), train["refresh"](name)

        library["train_this"].click(go_train, library["ingest_json"], [tabs, train["corpus"]], api_name="go_train",
                                    api_visibility="undocumented")

        def on_load(lib_selected, train_corpus, chat_corpora, chat_id, eval_corpus):
            return (*library["refresh"](lib_selected), train["refresh"](train_corpus),
                    *chat["refresh"](chat_corpora, chat_id), evaluation["refresh"](eval_corpus))

        demo.load(on_load,
                  [library["selected"], train["corpus"], chat["corpora"], chat["chat_id"], evaluation["corpus"]],
                  [*library["refresh_outputs"], train["corpus"], *chat["refresh_outputs"], evaluation["corpus"]],
                  api_name="load", api_visibility="undocumented")
    demo.queue(default_concurrency_limit=1)
    demo.training_queue = queue
    demo.watch_service = watcher
    return demo


def launch(port: int | None = None, open_browser: bool = True, share: bool = False):
    """Serve the app on 127.0.0.1 (a public share link only with `share`) and block until Ctrl-C."""
    if port is None:
        port = free_port()
    elif not port_is_free(port):
        raise UserError(f"port {port} is in use; pick another with --port or leave it out")
    demo = build_app()
    print(f"Cartridge Desktop: http://{HOST}:{port}  (Ctrl-C stops it)", flush=True)
    demo.launch(server_name=HOST, server_port=port, inbrowser=open_browser, share=share, quiet=True)
