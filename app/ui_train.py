"""Train tab: preset and settings, one background job at a time, live progress and loss curve, cancel."""

from __future__ import annotations

import html
import json

import gradio as gr
import pandas as pd

from app.ui_common import corpus_dropdown, duration, guarded, open_db, parse_version, version_choices, when
from engine.store import library, registry
from engine.errors import UserError
from engine.training.pipeline import make_config
from engine.training.distill import PRESETS

PHASES = [("load", "Load model"), ("synthesis", "Self-study"), ("training", "Training"), ("save", "Save")]
PRESET_HELP = {"demo": "CPU, about 2 minutes, to see the whole loop", "quick": "CPU, minutes",
               "standard": "GPU, tens of minutes", "thorough": "GPU, hours"}
PRESET_TRADE = {"demo": "It trades answer quality for speed: few conversations and a small cartridge, so its answers "
                        "know little of the folder. Train with quick for answers you can use."}
JOB_HEADERS = ["Job", "Corpus", "State", "Phase", "Submitted", "Finished", "Result"]
FINISHED = ("done", "failed", "cancelled")


def preset_choices() -> list[tuple[str, str]]:
    def count(cfg):
        if cfg.conversations_per_ktok <= 0:
            return f"{cfg.conversations:,} conversations"
        return f"{cfg.conversations:,}-{cfg.max_conversations:,} conversations"
    return [(f"{name} — {PRESET_HELP.get(name, '')} (p={p_range(cfg)}, {count(cfg)})", name)
            for name, cfg in PRESETS.items()]


def p_range(cfg) -> str:
    return f"{cfg.p}-{cfg.max_p}" if cfg.max_p > cfg.p else str(cfg.p)


def preset_note(preset: str) -> str:
    cfg = PRESETS.get(preset)
    if cfg is None:
        return ""
    passes = "one pass" if cfg.epochs == 1 else f"{cfg.epochs:g} passes"
    steps = f"{cfg.steps} steps" if cfg.steps else f"{passes} over the conversations"
    scaled = (f" ({cfg.conversations_per_ktok:g} per 1,000 corpus tokens, up to {cfg.max_conversations:,}, unless you "
              "set the number below)" if cfg.conversations_per_ktok > 0 else "")
    longer = (f"; {cfg.max_p_beyond_context} for a folder longer than the model's context, which is chatted with "
              "beside retrieval" if cfg.max_p_beyond_context else "")
    size = (f" (a quarter of the folder's tokens up to 512 and an eighth past that{longer}; or the p you set below)"
            if cfg.max_p > cfg.p else "")
    return (f"**{preset}**: a cartridge of **p = {p_range(cfg)}** virtual tokens{size}, trained on at least **{cfg.conversations:,}** "
            f"self-study conversations{scaled} over chunks of {cfg.chunk_tokens} tokens, batch {cfg.batch_size}, "
            f"{steps}, learning rate {cfg.lr:g}. *Advanced settings* start from these values. "
            + PRESET_TRADE.get(preset, "")).strip()


# -- views -----------------------------------------------------------------------------------------

def _bar(fraction: float | None) -> str:
    if fraction is None:
        return '<div class="cd-bar cd-bar-busy"><div></div></div>'
    return f'<div class="cd-bar"><div style="width:{max(0.0, min(1.0, fraction)) * 100:.1f}%"></div></div>'


def _steps(active: str | None, state: str) -> str:
    order = [p for p, _ in PHASES]
    index = order.index(active) if active in order else (len(order) if state == "done" else -1)
    items = []
    for i, (_, label) in enumerate(PHASES):
        cls = "done" if i < index or state == "done" else ("active" if i == index else "todo")
        items.append(f'<span class="cd-step {cls}">{label}</span>')
    return '<div class="cd-steps">' + '<span class="cd-arrow">→</span>'.join(items) + "</div>"


def job_card(job: dict) -> str:
    """HTML for the progress of one job (Job.to_json(), or a registry run shaped alike)."""
    state, phase = job["state"], job.get("phase")
    done, total = job.get("done") or 0, job.get("total") or 0
    head = (f'<div class="cd-job-head"><b>{html.escape(job["corpus"])}</b>'
            f'<span class="cd-pill cd-{state}">{html.escape(job.get("state_label") or state)}</span>'
            f'<span class="cd-muted">{html.escape(job.get("title") or "job #" + str(job["id"]))}</span></div>')
    figures, fraction = "", None
    if state == "queued":
        figures = "waiting for the job before it to finish"
        fraction = 0.0
    elif phase == "synthesis":
        fraction = done / total if total else None
        rate = f" · {job['rate']:.2f} conversations/s" if job.get("rate") else ""
        figures = f"self-study conversations <b>{done:,} / {total:,}</b>{rate} · ETA {duration(job.get('eta_s'))}"
    elif phase == "training":
        fraction = done / total if total else None
        loss = f" · loss <b>{job['loss']:.4f}</b>" if job.get("loss") is not None else ""
        rate = f" · {job['rate']:,.0f} tokens/s" if job.get("rate") else ""
        figures = f"step <b>{done:,} / {total:,}</b>{loss}{rate} · ETA {duration(job.get('eta_s'))}"
    elif state == "running" and phase == "load":
        figures = "loading the model (a few seconds; the first time up to minutes)"
    elif state == "running":
        figures = html.escape(job.get("message") or phase or "starting")
    if state == "done":
        fraction = 1.0
        outcome = job.get("outcome") or {}
        if outcome:
            figures = (f"v{outcome['version']} is ready: a cartridge of {outcome['tokens']} tokens from "
                       f"{outcome['conversations']} conversations, {outcome['steps']} steps, loss "
                       f"{outcome['loss_first']:.4f} → {outcome['loss_last']:.4f}, {duration(outcome['seconds'])}")
            heldout = outcome.get("heldout")
            score = heldout.get("score") if isinstance(heldout, dict) else heldout
            if score is not None:
                figures += (f" · held-out score <b>{score:.0%}</b> (the share of the teacher's advantage it recovers "
                            f"on self-study questions it never trained on)")
            if outcome.get("current") is False:
                figures += " · not made current: it scored clearly worse than the version serving"
        else:
            figures = "finished"
    elif state == "cancelled":
        figures = "stopped; tick <i>Resume</i> under Advanced settings to continue where it stopped"
    error = ""
    if job.get("error"):
        error = f'<div class="cd-error">{html.escape(library.friendly_error(job["error"]))}</div>'
    bar = _bar(fraction) if state in ("running", "queued", "done") else ""
    return (f'<div class="cd-job">{head}{_steps(phase, state)}{bar}'
            f'<div class="cd-figures">{figures}</div>{error}</div>')


def idle_card() -> str:
    return ('<div class="cd-job cd-idle">No training job yet. Pick a corpus and a preset, then press '
            '<b>Start training</b>. Jobs run in the background: you can chat, close this page and come back.</div>')


def run_as_job(db, run: dict) -> dict:
    """A registry run (e.g. from an earlier session or the command line) in Job.to_json() shape."""
    corpus = db["corpora"].get(run["corpus_id"])
    version = db["versions"].get(run["version_id"])
    curve = library.loss_curve(db, run["id"])
    states = {"running": "running", "done": "done", "failed": "failed"}
    state = states.get(run["status"], "cancelled")
    job = {"id": run["id"], "corpus": corpus["name"], "state": state, "phase": None, "error": run["error"],
           "title": f"run #{run['id']} · v{version['number']} · started {when(run['started'])}",
           "state_label": run["status"] if run["status"] not in states else None, "outcome": None}
    if state == "done" and run["summary"]:
        info = library.cartridge_info(run["cartridge"]) or {}
        job["outcome"] = {"version": version["number"], "tokens": info.get("p", "?"), **json.loads(run["summary"])}
    if state == "running":
        job["state_label"] = "running elsewhere"
        if curve:
            last = curve[-1]
            job.update(phase="training", done=last["step"], loss=last["loss"], rate=last["tokens_per_s"])
        else:
            job.update(phase="synthesis")
    return job


def plot_frame(points: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{"step": p["step"], "loss": p["loss"]} for p in points if p.get("loss") is not None])
    if frame.empty:
        return pd.DataFrame({"step": pd.Series(dtype="int"), "loss": pd.Series(dtype="float")})
    return frame


def jobs_rows(jobs: list) -> list[list]:
    rows = []
    for job in reversed(jobs[-20:]):
        j = job.to_json()
        result = library.friendly_error(j["error"]) if j["error"] else (
            f"v{j['outcome']['version']} ready" if j["outcome"] else "")
        rows.append([f"#{j['id']}", j["corpus"], j["state"], j["phase"] or "", when(j["submitted"]),
                     when(j["finished"]), result])
    return rows


# -- the tab ---------------------------------------------------------------------------------------

def build(ctx) -> dict:
    queue = ctx.queue
    quick = PRESETS["quick"]
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            with gr.Group():
                corpus = gr.Dropdown(allow_custom_value=True, label="Corpus", choices=[], elem_id="train-corpus")
                version = gr.Dropdown(allow_custom_value=True, label="Version", choices=[("latest", "")], value="",
                                      info="the latest version unless you pick an earlier one")
                preset = gr.Radio(preset_choices(), value="quick", label="Preset")
            note = gr.Markdown(preset_note("quick"), elem_classes="cd-note")
            with gr.Accordion("Advanced settings", open=False):
                with gr.Row():
                    p = gr.Number(quick.p, label="p (virtual tokens)", precision=0, minimum=2)
                    conversations = gr.Number(quick.conversations, label="Conversations", precision=0, minimum=1)
                    steps = gr.Number(quick.steps or 0, label="Steps (0 = preset passes)", precision=0, minimum=0)
                with gr.Row():
                    batch_size = gr.Number(quick.batch_size, label="Batch size", precision=0, minimum=1)
                    chunk_tokens = gr.Number(quick.chunk_tokens, label="Chunk tokens", precision=0, minimum=16)
                    lr = gr.Number(quick.lr, label="Learning rate", minimum=0)
                with gr.Row():
                    model = gr.Textbox(label="Model", placeholder="default: bundled SmolLM2-135M-Instruct",
                                       info="a Hugging Face id or a local folder", scale=2)
                    device = gr.Dropdown(["auto", "cpu", "cuda", "mps"], value="auto", label="Device", scale=1)
                resume = gr.Checkbox(label="Resume the stopped run of this version", value=False)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-btn")
                cancel = gr.Button("Cancel job", variant="stop", elem_id="cancel-btn")
        with gr.Column(scale=6):
            progress = gr.HTML(idle_card(), elem_id="train-progress")
            plot = gr.LinePlot(plot_frame([]), x="step", y="loss", title="Distillation loss", height=260,
                               x_title="training step", y_title="distillation loss (nats)", elem_id="loss-plot")
            jobs = gr.Dataframe(headers=JOB_HEADERS, value=[], interactive=False, label="Jobs", max_height=220,
                                wrap=True)
    job_json = gr.JSON(visible=False)
    seen = gr.State({})
    generation = gr.State(0)
    timer = gr.Timer(1.0)

    # -- handlers --

    def on_corpus(name):
        return gr.update(choices=version_choices(name, label_current="latest"), value="")

    @guarded
    def do_start(name, version_value, preset_name, p_, conv, steps_, batch, chunk, lr_, model_, device_, resume_):
        if not name:
            raise UserError("pick a corpus to train (add one on the Library tab)")
        overrides = {"p": p_, "conversations": conv, "steps": steps_, "batch_size": batch, "chunk_tokens": chunk,
                     "lr": lr_}
        overrides = {k: (float(v) if k == "lr" else int(v)) for k, v in overrides.items() if v not in (None, "")}
        if overrides.get("steps") == 0:
            overrides.pop("steps")  # the preset's number of passes over the conversations
        preset_cfg = PRESETS.get(preset_name)
        if preset_cfg is not None:  # only what the user changed: the preset's own values (and scaling) stay
            overrides = {k: v for k, v in overrides.items() if getattr(preset_cfg, k) != v}
        if "lr" in overrides and overrides["lr"] <= 0:
            raise UserError("the learning rate must be above 0 (the paper uses 2e-2)")
        make_config(preset_name, **overrides)  # bad settings fail here, before a job exists
        number = parse_version(version_value)
        with open_db() as db:
            corpus_row = registry.get_corpus(db, name)
            if number is not None:
                registry.get_version(db, corpus_row, number)
        running = queue.current
        if running is not None and running.corpus == name:
            raise UserError(f"{name!r} is training now (job #{running.id}); cancel it first to change its settings")
        kwargs = {"version": number, "preset": preset_name, "model": (model_ or "").strip() or None,
                  "device": None if device_ in (None, "", "auto") else device_, "resume": bool(resume_), **overrides}
        job = queue.submit(name, **kwargs)
        ahead = [j for j in queue.jobs() if j.state in ("queued", "running") and j.id != job.id]
        gr.Info(f"Job #{job.id}: training {name}" + (f" after {len(ahead)} job(s) ahead of it" if ahead else ""))
        return job.to_json()

    @guarded
    def do_cancel():
        job = queue.current or next((j for j in reversed(queue.jobs()) if j.state == "queued"), None)
        if job is None:
            raise UserError("no training job is running")
        queue.cancel(job.id)
        gr.Info(f"Stopping job #{job.id} ({job.corpus}); it can be resumed later")
        return job.to_json()

    def poll(state: dict, gen: int):
        all_jobs = queue.jobs()
        job = queue.current or (all_jobs[-1] if all_jobs else None)
        states = {j.id: j.state for j in all_jobs}
        changed = bool(state) and states != state.get("states")
        if state:  # tell about jobs that finished since this page last looked
            for j in all_jobs:
                before = state.get("states", {}).get(j.id)
                if before != j.state and j.state in FINISHED and before is not None:
                    if j.state == "done":
                        gr.Info(f"{j.corpus}: the cartridge is ready")
                    elif j.state == "failed":
                        error = library.friendly_error(j.error or "").removeprefix("training failed: ")
                        message = f"Training {j.corpus} failed: {error}"
                        gr.Warning(html.escape(message, quote=False), duration=None)
        if job is not None:
            card = job.to_json()
            if job.source == "watch":
                card["title"] = f"job #{job.id} · started by the folder watch"
            points = list(job.history)
            signature = (job.id, card["state"], card["phase"], card["done"], len(points), card["message"])
        else:
            with open_db() as db:
                runs = registry.list_runs(db)
                run = runs[-1] if runs else None
                card = run_as_job(db, run) if run else None
                points = library.loss_curve(db, run["id"]) if run else []
            signature = ("run", run and run["id"], run and run["status"], len(points))
        first = not state
        same = not first and signature == state.get("signature")
        new_state = {"states": states, "signature": signature}
        new_gen = gen + 1 if changed else gen
        if same:
            return gr.skip(), gr.skip(), gr.skip(), new_state, (new_gen if changed else gr.skip())
        html_card = job_card(card) if card else idle_card()
        return html_card, plot_frame(points), jobs_rows(all_jobs), new_state, (new_gen if changed else gr.skip())

    # -- wiring --
    def on_preset(name):
        cfg = PRESETS.get(name) or quick
        return preset_note(name), cfg.p, cfg.conversations, cfg.steps or 0, cfg.batch_size, cfg.chunk_tokens, cfg.lr

    corpus.change(on_corpus, corpus, version, api_name="train_versions")
    preset.change(on_preset, preset, [note, p, conversations, steps, batch_size, chunk_tokens, lr],
                  api_name="preset_settings")
    start.click(do_start, [corpus, version, preset, p, conversations, steps, batch_size, chunk_tokens, lr, model,
                           device, resume], job_json, api_name="train")
    cancel.click(do_cancel, None, job_json, api_name="cancel")
    timer.tick(poll, [seen, generation], [progress, plot, jobs, seen, generation], api_name="poll_jobs",
               show_progress="hidden", concurrency_limit=None)

    def refresh(current):
        return corpus_dropdown(current)

    return {"corpus": corpus, "refresh": refresh, "generation": generation, "job_json": job_json}
