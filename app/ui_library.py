"""Library tab: add a folder (preview, manifest), the list of corpora, rename / remove / make a version current."""

from __future__ import annotations

import html
import os
from pathlib import Path

import gradio as gr

from app import folder_picker
from app.ui_common import corpus_dropdown, guarded, number, open_db, version_choices, warn, when
from engine.store import library, registry
from engine.training import pipeline
from engine.errors import UserError
from engine.corpus.ingest import ingest

SAMPLE_FOLDER = Path(__file__).resolve().parent.parent / "assets" / "sample"
PREVIEW_IGNORE = "*/.git"  # the explorer is a preview; the scan applies the real rules

LIBRARY_HEADERS = ["Corpus", "Status", "Current", "Versions", "Files", "Tokens", "Cartridge", "p", "Held-out score",
                   "Trained", "Eval (answer NLL)", "Folder"]
MANIFEST_HEADERS = ["File", "Status", "Tokens", "Reason"]
VERSION_HEADERS = ["Version", "Status", "Files", "Tokens", "Cartridge", "p", "Held-out score", "Recorded", "Note"]


# -- pure views ------------------------------------------------------------------------------------

def library_rows(busy: set[str]) -> list[list]:
    with open_db() as db:
        summaries = library.corpus_summaries(db, busy)
    rows = []
    for s in summaries:
        status = s["status"] + (f": {s['error']}" if s["error"] else "") + (" · watched" if s["watch"] else "")
        rows.append([s["name"], status, f"v{s['current_version']}" if s["current_version"] else "–",
                     s["versions"], s["files"], number(s["tokens"]),
                     f"{s['cartridge_mb']:.2f} MB" if s["cartridge_mb"] is not None else "–",
                     s["p"] if s["p"] is not None else "–", percent(s["heldout"]), when(s["trained"]) or "–",
                     library.eval_brief(s["eval"]) or "–", s["root"]])
    return rows


def percent(score: float | None) -> str:
    """A held-out score as a share ("62%"), or a dash when the cartridge has none."""
    return "–" if score is None else f"{score:.0%}"


def manifest_view(files: list[dict], title: str) -> tuple[str, list[list]]:
    totals = library.manifest_summary(files)
    lines = [f"### {html.escape(title)}",
             f"**{totals['included']:,} files included** · {totals['skipped']:,} skipped · "
             f"**{totals['tokens']:,} tokens** in the corpus"]
    if totals["reasons"]:
        lines.append("Skipped: " + ", ".join(f"{html.escape(reason)} ({count})" for reason, count in totals["reasons"]))
    if totals["warning"]:
        lines.append(f"> ⚠️ {totals['warning']}")
    if not totals["icl_fits"]:
        lines.append("> The whole folder does not fit the default model's context, so the *in context (icl)* "
                     "comparison in Chat and Evaluate will not run for it; the cartridge will.")
    rows = [[f["path"], f["status"], f["tokens"] if f["tokens"] is not None else "", f["reason"] or ""]
            for f in files]
    return "\n\n".join(lines), rows


def folder_frame(files: list[dict]):
    """Files per top-level folder and status (included / skipped), for the Library's bar chart."""
    import pandas as pd

    counts: dict[tuple[str, str], int] = {}
    for f in files:
        top = f["path"].split("/", 1)[0] + "/" if "/" in f["path"] else "(top level)"
        counts[(top, f["status"])] = counts.get((top, f["status"]), 0) + 1
    biggest = sorted({top for top, _ in counts}, key=lambda t: -sum(n for (k, _), n in counts.items() if k == t))[:15]
    rows = [{"folder": top, "status": status, "files": n} for (top, status), n in counts.items() if top in biggest]
    return pd.DataFrame(rows or [{"folder": "", "status": "included", "files": 0}])


def version_view(corpus: str | None) -> list[list]:
    if not corpus:
        return []
    with open_db() as db:
        if registry.find_corpus(db, name=corpus) is None:
            return []
        rows = library.version_rows(db, corpus)
    return [[f"v{v['number']}" + (" (current)" if v["current"] else ""), v["status"], v["files"], number(v["tokens"]),
             f"{v['cartridge_mb']:.2f} MB" if v["cartridge_mb"] is not None else "–",
             v["p"] if v["p"] is not None else "–", percent(v["heldout"]), when(v["created"]), v["error"] or ""]
            for v in rows]


def _patterns(text: str | None) -> list[str] | None:
    items = [p.strip() for line in (text or "").splitlines() for p in line.split(",") if p.strip()]
    return items or None


# -- the tab ---------------------------------------------------------------------------------------

def build(ctx) -> dict:
    queue = ctx.queue
    gr.Markdown("Add a folder to make it a **corpus**. Cartridge Desktop reads it (it never writes to it), "
                "records a version of its text, and shows you exactly what goes in before you train.",
                elem_classes="lead")
    with gr.Row(equal_height=False):
        with gr.Column(scale=5):
            with gr.Group():
                with gr.Row(equal_height=True):
                    path = gr.Textbox(label="Folder", elem_id="folder-path", scale=5,
                                      placeholder="/home/you/notes  or  ~/code/project",
                                      info="Browse, pick a recent folder, or type a path and press Enter.")
                    browse_btn = gr.Button("Browse…", elem_id="browse-btn", scale=1, min_width=110)
                recent = gr.Dropdown(choices=[], value=None, label="Recent folders", elem_id="recent-folders",
                                     allow_custom_value=True)
            # The in-page folder browser, for when no desktop dialog can open (e.g. the app runs on a server).
            with gr.Group(visible=False, elem_id="folder-browser") as browser:
                browse_where = gr.Markdown(elem_id="browser-where")
                browse_dir = gr.State("")
                browse_list = gr.Dropdown(choices=[], value=None, label="Open a folder inside",
                                          elem_id="browser-subfolders", allow_custom_value=True)
                with gr.Row():
                    browse_up = gr.Button("⬆ Up", size="sm", elem_id="browser-up")
                    browse_use = gr.Button("Use this folder", size="sm", variant="primary", elem_id="browser-use")
                    browse_close = gr.Button("Close", size="sm")
            with gr.Group():
                name = gr.Textbox(label="Name (optional)", placeholder="defaults to the folder's name")
                exclude = gr.Textbox(label="Exclude patterns (optional)", lines=2, elem_id="exclude-patterns",
                                     placeholder="drafts/\n*.csv",
                                     info="gitignore-style, one per line; .gitignore files are honoured already")
            with gr.Row():
                scan_btn = gr.Button("Scan folder", variant="primary", elem_id="scan-btn")
                sample_btn = gr.Button("Use the sample folder", variant="secondary", size="md")
        with gr.Column(scale=4):
            # One explorer, re-pointed at each folder (an explorer created later by a re-render breaks in the page).
            placeholder = gr.Markdown("*A preview of the folder appears here.*", elem_classes="placeholder")
            explorer = gr.FileExplorer(root_dir=SAMPLE_FOLDER, glob="**/*", ignore_glob=PREVIEW_IGNORE,
                                       label="Preview", max_height=300, file_count="multiple", visible=False,
                                       interactive=True,
                                       elem_id="folder-preview")
            drop = gr.Button("Exclude the selected files", size="sm", visible=False)
            preview_root = gr.State("")

    manifest_md = gr.Markdown(elem_id="manifest-summary")
    files_chart = gr.BarPlot(folder_frame([]), x="folder", y="files", color="status", visible=False, height=240,
                             title="Files per top-level folder", x_title="", y_title="files", elem_id="files-chart",
                             sort=None)
    manifest = gr.Dataframe(headers=MANIFEST_HEADERS, value=[], interactive=False, label="Manifest", max_height=320,
                            column_widths=["50%", "12%", "10%", "28%"], wrap=True, visible=False)
    ingest_json = gr.JSON(visible=False)
    train_this = gr.Button("Train this corpus →", variant="primary", visible=False, size="md")

    with gr.Row(equal_height=True, elem_classes="cd-section"):
        gr.Markdown("## Your corpora")
        refresh_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
    table = gr.Dataframe(headers=LIBRARY_HEADERS, value=[], interactive=False, wrap=True, max_height=360,
                         elem_id="library-table", label="Click a row to manage it")
    with gr.Group():
        selected = gr.Dropdown(allow_custom_value=True, label="Manage corpus", choices=[], elem_id="manage-corpus")
        with gr.Tabs():
            with gr.Tab("Versions"):
                versions = gr.Dataframe(headers=VERSION_HEADERS, value=[], interactive=False, max_height=260)
                with gr.Row(equal_height=False, elem_classes="cd-inline"):
                    version_pick = gr.Dropdown(allow_custom_value=True, label="Trained version", choices=[], scale=3)
                    make_current = gr.Button("Make this version current", scale=2, size="md")
            with gr.Tab("Files"):
                show_files = gr.Button("Show the files of the last scan", size="md")
            with gr.Tab("Watch"):
                watch_box = gr.Checkbox(label="Watch this folder: rescan it when files change and retrain the "
                                              "cartridge in the background", elem_id="watch-box")
                watch_md = gr.Markdown(elem_classes="cd-note")
            with gr.Tab("Rename"):
                with gr.Row(equal_height=False, elem_classes="cd-inline"):
                    new_name = gr.Textbox(label="New name", scale=3)
                    rename_btn = gr.Button("Rename", scale=1, size="md")
            with gr.Tab("Remove"):
                gr.Markdown("Removing forgets the corpus, its versions, cartridges' records and training runs. "
                            "**The folder on disk is not touched.**")
                remove_btn = gr.Button("Remove from the library…", variant="stop", size="md")
                with gr.Row(visible=False) as confirm_row:
                    confirm_md = gr.Markdown()
                    confirm_yes = gr.Button("Yes, remove it", variant="stop", size="md")
                    confirm_no = gr.Button("Cancel", size="md")

    # -- handlers --

    def refresh_all(current):
        """The corpora table, the corpus picker and the picked corpus's versions, as they are now."""
        picker = corpus_dropdown(current)
        chosen = picker.get("value")
        return (library_rows(queue.busy_corpora()), picker, version_view(chosen),
                gr.update(choices=version_choices(chosen, ready_only=True)[1:]))

    def watch_view(corpus):
        if not corpus:
            return gr.update(value=False, interactive=False), ""
        with open_db() as db:
            row = registry.find_corpus(db, name=corpus)
        if row is None:
            return gr.update(value=False, interactive=False), ""
        if ctx.watcher is None:
            return gr.update(value=row["watch"], interactive=False), "Folder watch is off in this session."
        status = ctx.watcher.status(corpus)
        if not status:
            return gr.update(value=False, interactive=True), (
                "Not watched. When on, changes are picked up after the folder has been quiet for a minute; "
                "chat keeps using the current cartridge until the new one is ready.")
        how = "following changes as they happen" if status["mode"] == "events" else "rescanning every few minutes"
        parts = [f"Watching `{html.escape(status['root'])}`, {how}; {status['state']}"]
        if status["pending"]:
            parts.append(f"{status['pending']} changed file(s) waiting for the folder to be quiet")
        if status.get("last_event"):
            event = status["last_event"]
            parts.append(f"last: {html.escape(event['message'])} ({when(event['created'])})")
        if status.get("error"):
            parts.append(f"**{html.escape(status['error'])}**")
        return gr.update(value=True, interactive=True), " · ".join(parts)

    def on_selected(corpus):
        return (version_view(corpus), gr.update(choices=version_choices(corpus, ready_only=True)[1:], value=None),
                gr.update(visible=False), *watch_view(corpus))

    @guarded
    def do_watch(corpus, on):
        if not corpus:
            raise UserError("pick a corpus first")
        if ctx.watcher is None:
            raise UserError("folder watch is off in this session")
        if on:
            ctx.watcher.watch(corpus)
            gr.Info(f"Watching {corpus}: changes will be trained in the background")
        else:
            ctx.watcher.unwatch(corpus)
            gr.Info(f"No longer watching {corpus}")
        return (library_rows(queue.busy_corpora()), *watch_view(corpus))

    def set_preview(folder, shown):
        folder = os.path.expanduser((folder or "").strip())
        root = os.path.realpath(folder) if folder and os.path.isdir(folder) else ""
        if root == shown:  # e.g. the field lost focus: keep the explorer and what is selected in it
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not root:
            return gr.update(visible=True), gr.update(visible=False), gr.update(visible=False), ""
        return (gr.update(visible=False), gr.update(root_dir=root, label=f"Preview of {root}", value=[], visible=True),
                gr.update(visible=True), root)

    def recent_choices():
        with open_db() as db:
            roots = [c["root"] for c in sorted(registry.list_corpora(db), key=lambda c: -(c.get("created") or 0))]
        return [r for r in dict.fromkeys(roots + [str(SAMPLE_FOLDER)]) if os.path.isdir(r)]

    def browser_view(folder):
        folder = os.path.realpath(folder)
        names = folder_picker.subfolders(folder)
        where = f"**{html.escape(folder)}** · {len(names)} folder{'s' if len(names) != 1 else ''}"
        return (gr.update(visible=True), where, folder,
                gr.update(choices=[(n + "/", n) for n in names], value=None))

    def do_browse(current):
        """The system's folder dialog when there is one; otherwise the in-page browser, at the home folder."""
        start = os.path.expanduser((current or "").strip())
        start = start if start and os.path.isdir(start) else str(Path.home())
        try:
            chosen = folder_picker.pick_with_dialog(start)
        except folder_picker.NoDialog:
            return (gr.skip(), *browser_view(start))
        return (chosen if chosen else gr.skip(), gr.update(visible=False), gr.skip(), gr.skip(), gr.skip())

    def do_browse_into(folder, name):
        if not name or not os.path.isdir(os.path.join(folder, name)):  # e.g. a name typed that is no folder
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return browser_view(os.path.join(folder, name))

    def do_browse_up(folder):
        return browser_view(os.path.dirname(os.path.realpath(folder)) or folder)

    def add_excludes(selected, folder, current):
        root = os.path.realpath(os.path.expanduser((folder or "").strip() or "."))
        lines = [line for line in (current or "").splitlines() if line.strip()]
        for path in selected or []:
            rel = os.path.relpath(path, root)
            if rel in (".", "") or rel.startswith(".."):
                continue
            lines.append(rel.replace(os.sep, "/") + ("/" if os.path.isdir(path) else ""))
        return "\n".join(dict.fromkeys(lines))

    @guarded
    def do_ingest(folder, corpus_name, patterns, progress=gr.Progress()):
        folder = (folder or "").strip()
        if not folder:
            raise UserError("type the path of a folder first")
        seen = {"n": 0}

        def on_progress(count, rel):
            if count - seen["n"] >= 25:
                seen["n"] = count
                progress(None, desc=f"scanned {count:,} files · {rel}")

        with open_db() as db:
            result = ingest(folder, name=(corpus_name or "").strip() or None, ignore=_patterns(patterns), db=db,
                            on_progress=on_progress)
        files = [{"path": f.path, "status": f.status, "reason": f.reason, "tokens": f.tokens} for f in result.files]
        state = f"new version v{result.version['number']}" if result.changed else \
            f"unchanged since v{result.version['number']}"
        summary, rows = manifest_view(files, f"{result.corpus['name']} — {state}")
        if library.budget_warning(result.version["tokens"]):
            warn(library.budget_warning(result.version["tokens"]))
        doc = result.to_json()  # for API callers; "path" keys would be taken for file objects by gradio_client
        doc["files"] = [{"file": f.pop("path"), **f} for f in doc["files"]]
        return (summary, gr.update(value=rows, visible=True), doc,
                gr.update(visible=True), library_rows(queue.busy_corpora()),
                corpus_dropdown(result.corpus["name"]))

    @guarded
    def do_show_files(corpus):
        if not corpus:
            raise UserError("pick a corpus first")
        with open_db() as db:
            files = library.catalog_manifest(db, corpus)
        summary, rows = manifest_view(files, f"{corpus} — files of the last scan")
        return summary, gr.update(value=rows, visible=True), gr.update(visible=False)

    def files_chart_of(corpus):
        if not corpus:
            return gr.update(visible=False)
        with open_db() as db:
            try:
                files = library.catalog_manifest(db, corpus)
            except UserError:
                return gr.update(visible=False)
        return gr.update(value=folder_frame(files), visible=True)

    @guarded
    def do_rename(corpus, new):
        new = (new or "").strip()
        if not corpus or not new:
            raise UserError("pick a corpus and type its new name")
        if corpus in queue.busy_corpora():
            raise UserError(f"{corpus!r} is training; rename it when the job is over")
        watched = ctx.watcher is not None and ctx.watcher.status(corpus) is not None
        if watched:
            ctx.watcher.unwatch(corpus)
        with open_db() as db:
            registry.rename_corpus(db, corpus, new)
        ctx.forget_corpus(corpus)
        if watched:
            ctx.watcher.watch(new)
        gr.Info(f"Renamed {corpus} to {new}")
        return library_rows(queue.busy_corpora()), corpus_dropdown(new), ""

    @guarded
    def ask_remove(corpus):
        if not corpus:
            raise UserError("pick a corpus first")
        with open_db() as db:
            root = registry.get_corpus(db, corpus)["root"]
        return gr.update(visible=True), (f"Remove **{html.escape(corpus)}** from the library? "
                                         f"Your files in `{html.escape(root)}` stay where they are.")

    @guarded
    def do_remove(corpus):
        if not corpus:
            raise UserError("pick a corpus first")
        if corpus in queue.busy_corpora():
            raise UserError(f"{corpus!r} has a training job; cancel it on the Train tab first")
        if ctx.watcher is not None and ctx.watcher.status(corpus) is not None:
            ctx.watcher.unwatch(corpus)
        with open_db() as db:
            pipeline.remove_corpus(db, corpus)
        ctx.forget_corpus(corpus)
        gr.Info(f"Removed {corpus} from the library (its folder is untouched)")
        return library_rows(queue.busy_corpora()), corpus_dropdown(None), gr.update(visible=False)

    @guarded
    def do_make_current(corpus, version):
        if not corpus or not version:
            raise UserError("pick a corpus and one of its trained versions")
        with open_db() as db:
            registry.set_current_version(db, registry.get_corpus(db, corpus), int(version))
        gr.Info(f"{corpus}: v{version} is now current")
        return library_rows(queue.busy_corpora()), version_view(corpus)

    def pick_row(evt: gr.SelectData, rows):
        try:
            row = evt.index[0]
            return rows.iloc[row, 0] if hasattr(rows, "iloc") else rows[row][0]
        except (IndexError, KeyError, TypeError):
            return gr.skip()

    # -- wiring --
    preview_in, preview = [path, preview_root], [placeholder, explorer, drop, preview_root]
    quiet = {"api_visibility": "undocumented", "show_progress": "hidden"}
    path.submit(set_preview, preview_in, preview, api_name="preview_folder", show_progress="hidden")
    path.blur(set_preview, preview_in, preview, api_name="preview_folder_blur", **quiet)
    drop.click(add_excludes, [explorer, path, exclude], exclude, api_name="exclude_selected",
               api_visibility="undocumented")
    browser_out = [browser, browse_where, browse_dir, browse_list]
    browse_btn.click(do_browse, path, [path] + browser_out, api_name="browse_folder").then(
        set_preview, preview_in, preview, **quiet)
    browse_list.input(do_browse_into, [browse_dir, browse_list], browser_out, api_name="browse_into")
    browse_up.click(do_browse_up, browse_dir, browser_out, api_name="browse_up")
    browse_use.click(lambda folder: (folder, gr.update(visible=False)), browse_dir, [path, browser],
                     api_name="browse_use").then(set_preview, preview_in, preview, **quiet)
    browse_close.click(lambda: gr.update(visible=False), None, browser, api_visibility="undocumented")
    recent.focus(lambda: gr.update(choices=recent_choices()), None, recent, api_name="recent_folders", **quiet)
    recent.input(lambda folder: folder or gr.skip(), recent, path, api_name="use_recent").then(
        set_preview, preview_in, preview, **quiet)
    sample_btn.click(lambda: (str(SAMPLE_FOLDER), ""), None, [path, name], api_name="sample_folder").then(
        set_preview, preview_in, preview, api_name="preview_sample", **quiet)
    scan_btn.click(do_ingest, [path, name, exclude], [manifest_md, manifest, ingest_json, train_this, table, selected],
                   api_name="ingest").then(set_preview, preview_in, preview, api_name="preview_scanned", **quiet).then(
        files_chart_of, selected, files_chart, **quiet)
    refresh_outputs = [table, selected, versions, version_pick]
    refresh_btn.click(refresh_all, selected, refresh_outputs, api_name="refresh_library")
    selected.change(on_selected, selected, [versions, version_pick, confirm_row, watch_box, watch_md],
                    api_name="corpus_versions")
    watch_box.input(do_watch, [selected, watch_box], [table, watch_box, watch_md], api_name="watch_corpus")
    table.select(pick_row, table, selected, api_name="pick_corpus_row", api_visibility="undocumented")
    show_files.click(do_show_files, selected, [manifest_md, manifest, train_this], api_name="manifest").then(
        files_chart_of, selected, files_chart, api_name="files_chart", **quiet)
    rename_btn.click(do_rename, [selected, new_name], [table, selected, new_name], api_name="rename_corpus")
    remove_btn.click(ask_remove, selected, [confirm_row, confirm_md], api_name="ask_remove",
                     api_visibility="undocumented")
    confirm_no.click(lambda: gr.update(visible=False), None, confirm_row, api_name="cancel_remove",
                     api_visibility="undocumented")
    confirm_yes.click(do_remove, selected, [table, selected, confirm_row], api_name="remove_corpus")
    make_current.click(do_make_current, [selected, version_pick], [table, versions], api_name="make_current")

    return {"table": table, "selected": selected, "refresh": refresh_all, "refresh_outputs": refresh_outputs,
            "train_this": train_this,
            "ingest_json": ingest_json}
