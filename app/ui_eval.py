"""Evaluate tab: a QA file scored with no corpus, the corpus in context and the cartridge, side by side."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import pandas as pd

from app.ui_common import corpus_dropdown, guarded, open_db, parse_version, version_choices
from engine.store import library
from engine.errors import UserError

SAMPLE_QA = Path(__file__).resolve().parent.parent / "assets" / "sample_qa.jsonl"
MODE_LABELS = {"none": "none (no corpus)", "icl": "icl (folder in context)", "init": "untrained cartridge",
               "cartridge": "cartridge", "rag": "rag (retrieved passages)", "cartridge+rag": "cartridge + rag"}
TABLE_HEADERS = ["Mode", "Accuracy (higher is better)", "Answer NLL (lower is better)", "KV memory",
                 "Time to first token"]


def result_views(result: dict) -> tuple[pd.DataFrame, pd.DataFrame, list[list], str]:
    """(NLL chart frame, accuracy chart frame, table rows, summary markdown) of an evaluation."""
    modes = result["modes"]
    frame = pd.DataFrame([{"mode": MODE_LABELS.get(m, m), "nll": f["nll"]} for m, f in modes.items()])
    graded = {m: f["accuracy"] for m, f in modes.items() if "accuracy" in f}
    accuracy = (pd.DataFrame([{"mode": MODE_LABELS.get(m, m), "accuracy": 100 * a} for m, a in graded.items()])
                if graded else empty_frame("accuracy"))
    rows = [[MODE_LABELS.get(m, m), f"{100 * graded[m]:.0f}%" if m in graded else "-", f"{f['nll']:.4f}",
             f"{f['kv_bytes'] / 1e6:,.2f} MB", f"{f['ttft_s']:.3f} s"] for m, f in modes.items()]
    lines = [f"### {html.escape(result['corpus'])} v{result['version']} · {result['questions']} questions"]
    for mode, why in (result.get("skipped") or {}).items():
        lines.append(f"{MODE_LABELS.get(mode, mode)} was skipped: {html.escape(why)}.")
    if graded:
        lines.append(f"Accuracy: the share of the {result['graded']} questions with expected strings whose generated "
                     f"answer (up to {result['answer_tokens']} tokens, decoded as in chat) contains them all.")
    if result.get("recovered") is not None:
        lines.append(f"The cartridge recovers **{result['recovered']:.0%}** of the gain that putting the whole folder "
                     f"in context gives over no corpus (answer NLL).")
    elif {"none", "icl", "cartridge"} <= set(modes):
        lines.append("The folder in context did not beat no corpus on these questions, so no recovered share is shown.")
    if "cartridge" in modes and "icl" in modes and modes["cartridge"]["kv_bytes"]:
        ratio = modes["icl"]["kv_bytes"] / modes["cartridge"]["kv_bytes"]
        lines.append(f"The cartridge needs **{ratio:,.1f}×** less KV memory than the folder in context.")
    if "init" in modes and "cartridge" in modes:
        lines.append(f"Training moved the answer NLL from {modes['init']['nll']:.3f} (untrained) "
                     f"to {modes['cartridge']['nll']:.3f}.")
    return frame, accuracy, rows, "\n\n".join(lines)


def empty_frame(column: str = "nll") -> pd.DataFrame:
    return pd.DataFrame({"mode": pd.Series(dtype="str"), column: pd.Series(dtype="float")})


def build(ctx) -> dict:
    gr.Markdown("Score a set of questions with known answers: how likely the model finds each gold answer with "
                "**no corpus**, with **the whole folder in context** (icl), and with **the cartridge**. "
                "The QA file is JSON Lines, one `{\"question\": …, \"answer\": …}` per line; a line with "
                "`\"expect\": [\"…\"]` also gets a generated answer, correct when it contains every expected string.",
                elem_classes="lead")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            with gr.Group():
                corpus = gr.Dropdown(allow_custom_value=True, label="Corpus", choices=[], elem_id="eval-corpus")
                version = gr.Dropdown(allow_custom_value=True, label="Version", choices=[("current", "")], value="")
                qa = gr.File(label="QA file (.jsonl)", file_types=[".jsonl", ".json", ".txt"], type="filepath",
                             elem_id="eval-qa")
                modes = gr.CheckboxGroup([(label, m) for m, label in MODE_LABELS.items()],
                                         value=["none", "icl", "cartridge"], label="Modes")
            with gr.Row():
                run = gr.Button("Run evaluation", variant="primary", elem_id="eval-btn")
                sample = gr.Button("Use the sample questions", size="md")
        with gr.Column(scale=6):
            summary = gr.Markdown("*Results appear here.*", elem_id="eval-summary")
            order = list(MODE_LABELS.values())
            chart = gr.BarPlot(empty_frame(), x="mode", y="nll", title="Answer NLL by mode (lower is better)",
                               x_title="", y_title="answer NLL", height=260, sort=order, y_lim=[0, None],
                               elem_id="eval-chart")  # bars from 0, so differences are not exaggerated
            accuracy_chart = gr.BarPlot(empty_frame("accuracy"), x="mode", y="accuracy",
                                        title="Answer accuracy by mode (higher is better)", x_title="",
                                        y_title="accuracy (%)", height=260, sort=order, y_lim=[0, 100],
                                        elem_id="eval-accuracy-chart")
            table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, elem_id="eval-table",
                                 column_widths=["24%", "20%", "22%", "16%", "18%"], wrap=True)
    result_json = gr.JSON(visible=False)

    @guarded
    def do_eval(name, version_value, qa_path, chosen, progress=gr.Progress()):
        from engine.serve import evaluate

        if not name:
            raise UserError("pick a corpus to evaluate")
        if not qa_path:
            raise UserError("upload a QA file (.jsonl) first")
        if not chosen:
            raise UserError("pick at least one mode")
        questions = evaluate.read_qa(qa_path)
        progress(0, desc=f"loading the model for {len(questions)} questions")

        def on_progress(mode, done, total):
            progress(done / total, desc=f"{mode}: question {done} / {total}")

        order = [m for m in MODE_LABELS if m in chosen]
        with open_db() as db:
            result = evaluate.evaluate(db, name, qa_path, modes=tuple(order), version=parse_version(version_value),
                                       on_progress=on_progress)
            library.record_eval(db, result, Path(qa_path).name)
        frame, accuracy, rows, text = result_views(result)
        return text, frame, accuracy, rows, result

    def on_corpus(name):
        return gr.update(choices=version_choices(name, ready_only=True), value="")

    corpus.change(on_corpus, corpus, version, api_name="eval_versions", api_visibility="undocumented")
    sample.click(lambda: str(SAMPLE_QA), None, qa, api_name="sample_qa")
    run.click(do_eval, [corpus, version, qa, modes], [summary, chart, accuracy_chart, table, result_json],
              api_name="evaluate",
              concurrency_id="generate", concurrency_limit=1)

    def refresh(current):
        return corpus_dropdown(current)

    return {"corpus": corpus, "refresh": refresh}
