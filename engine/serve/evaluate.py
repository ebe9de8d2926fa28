"""Evaluation: how likely the model finds gold answers with no context, the corpus in context, or a cartridge.

Per mode, the mean per-token negative log-likelihood of each gold answer scored as the assistant turn
after its question in the chat template. `recovered = (none - cartridge) / (none - icl)` is the share
of in-context learning's gain that the cartridge recovers. The `init` mode scores the untrained cartridge
(the KV of the corpus's first p tokens, as training starts from), to show what training added. `rag`
puts the passages retrieved for each question in the prompt (the cartridge's p tokens by default), and
`cartridge+rag` puts them after the cartridge. A corpus too long for the model's context skips `icl`,
with the reason under "skipped".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from engine.store import registry
from engine.cartridge.format import compose, init_embeddings, load_cartridge
from engine.cartridge.metadata import read_metadata
from engine.corpus.chunks import ChunkSampler, assemble, version_documents
from engine.engines.decoding import DEFAULT_DECODING, EVAL_ANSWER_TOKENS, Decoding, LoopGuard, contains_all, stop_ids
from engine.errors import UserError
from engine.serve.inference import RAG_MODES
from engine.engines.models import LoadedModel, chat_ids, context_system_prompt, load_model, passages_messages

EVAL_MODES = ("none", "icl", "init", "cartridge", "rag", "cartridge+rag")
NEEDS_CARTRIDGE = ("init", "cartridge", "cartridge+rag")
EVAL_DECODING = Decoding(max_new_tokens=EVAL_ANSWER_TOKENS, temperature=0.0,
                         no_repeat_ngram=DEFAULT_DECODING.no_repeat_ngram)


def read_qa(path: str | Path) -> list[dict]:
    """JSON Lines of {"question", "answer", optional "expect": [strings]}; any bad line is a UserError naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # (a byte-order mark, as some editors write)
    except OSError as exc:
        raise UserError(f"cannot read QA file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"QA file {path} is not UTF-8 text (JSON Lines expected)") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item.get("question"), str) or not isinstance(item.get("answer"), str):
                raise ValueError
            if not item["question"].strip() or not item["answer"].strip():
                raise UserError(f"{path}:{number}: the question and the answer must not be empty")
            expect = item.get("expect")
            if expect is not None and (not isinstance(expect, list) or not expect
                                       or not all(isinstance(e, str) and e.strip() for e in expect)):
                raise UserError(f"{path}:{number}: \"expect\" must be a list of non-empty strings")
        except (ValueError, AttributeError):
            raise UserError(f"{path}:{number}: expected {{\"question\": ..., \"answer\": ...}}") from None
        items.append(item)
    if not items:
        raise UserError(f"QA file {path} holds no questions")
    return items


class Scorer:
    """Scores answers over any inference engine after a fixed prefix: a cartridge, the corpus as system
    prompt (evaluated once), or none; rag builds a system prompt per question (`context`)."""

    def __init__(self, engine, tokenizer, *, embeddings: torch.Tensor | None = None, system: str | None = None,
                 context: Callable[[str], str] | None = None):
        self.engine, self.tokenizer, self.system, self.context = engine, tokenizer, system, context
        self.after_cartridge = embeddings is not None
        self.skip = 0  # leading prompt tokens already held by the prefix
        self.system_ids: list[int] = []
        if system is not None:
            self.system_ids = chat_ids(tokenizer, [{"role": "system", "content": system}], add_generation_prompt=False)
            self.skip = engine.set_prefix(system_ids=self.system_ids)
        else:
            engine.set_prefix(embeddings)

    def messages(self, question: str) -> list[dict]:
        """The prompt: a fixed system prompt (icl), one made for the question (`context`: rag), or none."""
        user = [{"role": "user", "content": question}]
        if self.context is not None:
            return passages_messages(self.tokenizer, self.context(question), user, after_cartridge=self.after_cartridge)
        return ([{"role": "system", "content": self.system}] if self.system else []) + user

    def nll(self, question: str, answer: str) -> float:
        messages = self.messages(question)
        prompt = chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        full = chat_ids(self.tokenizer, messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
        if full[:len(prompt)] != prompt or full[:self.skip] != self.system_ids[:self.skip]:
            raise UserError("this model's chat template does not extend the prompt with the answer; cannot score")
        return self.engine.score(full[self.skip:], len(prompt) - self.skip)

    def answer(self, question: str, decoding: Decoding) -> str:
        """The answer generated after the prefix, decoded exactly as chat decodes (loop guard included)."""
        guard = LoopGuard(decoding.no_repeat_ngram)
        rest = chat_ids(self.tokenizer, self.messages(question), add_generation_prompt=True)[self.skip:]
        self.engine.generate(rest, decoding.max_new_tokens, temperature=decoding.temperature,
                             stop_ids=stop_ids(self.tokenizer), guard=guard)
        return self.tokenizer.decode(guard.kept(), skip_special_tokens=True).strip()

    def first_token_s(self, question: str) -> float:
        """Seconds from nothing cached to the first token of the answer to `question` (the prefix included)."""
        rest = chat_ids(self.tokenizer, self.messages(question), add_generation_prompt=True)[self.skip:]
        return self.engine.first_token_s(rest)


def _scoring_engine(lm: LoadedModel, requested: str | None, model: str | None):
    """Like chat: llama.cpp for the bundled GGUF on a CPU (what answers the user), torch otherwise."""
    from engine.engines.torch_engine import TorchEngine
    from engine.serve.inference import choose_engine

    if choose_engine(requested, model) == "llama.cpp" and (requested == "llama.cpp" or lm.device.type == "cpu"):
        from engine.engines.llamacpp import LayoutUnsupported
        from engine.engines.llamacpp_inference import LlamaCppInference
        from engine.engines.llamacpp_worker import LlamaCppProcess

        try:
            return LlamaCppInference(LlamaCppProcess(n_ctx=lm.max_positions))
        except LayoutUnsupported:
            if requested == "llama.cpp":
                raise
    return TorchEngine(lm)


def evaluate(db, corpus_name: str, qa_path: str | Path, *, modes: tuple[str, ...] = EVAL_MODES,
             version: int | None = None, model: str | None = None, device: str | None = None,
             cartridge_folder: Path | None = None, engine: str | None = None,
             on_progress: Callable[[str, int, int], None] | None = None, decoding: Decoding = EVAL_DECODING,
             rag_tokens: int | None = None) -> dict:
    """Run the QA file through each mode; returns {"modes": {mode: {nll, accuracy, kv_bytes, ttft_s}},
    "recovered", ...}. Lines with "expect" also get a generated answer per mode (`decoding`, as chat
    decodes but capped at EVAL_ANSWER_TOKENS): `accuracy` is the share containing all their expect strings."""
    for mode in modes:
        if mode not in EVAL_MODES:
            raise UserError(f"unknown eval mode {mode!r} (choose from {', '.join(EVAL_MODES)})")
    if not modes:
        raise UserError(f"name at least one mode to evaluate (from {', '.join(EVAL_MODES)})")
    modes = tuple(dict.fromkeys(modes))  # each once, in the order given
    qa = read_qa(qa_path)
    corpus = registry.get_corpus(db, corpus_name)
    row = registry.get_version(db, corpus, version)
    cartridge = None
    if any(m in NEEDS_CARTRIDGE for m in modes):
        if cartridge_folder is None:
            if row["status"] != "ready" or not row["cartridge"]:
                raise UserError(f"{corpus_name!r} v{row['number']} has no trained cartridge yet: run `cartridge train`")
            cartridge_folder = Path(row["cartridge"])
        if model is None:
            model = read_metadata(cartridge_folder).get("base_model")
    lm = load_model(model, device)
    if cartridge_folder is not None:
        cartridge = load_cartridge(Path(cartridge_folder), lm)
    documents = version_documents(db, row)
    corpus_text = assemble(documents)
    prefixes = {"cartridge": compose([cartridge]) if cartridge is not None else None}
    prefixes["cartridge+rag"] = prefixes["cartridge"]
    context = None
    if any(m in RAG_MODES for m in modes):
        from engine.serve.inference import _cartridge_p
        from engine.corpus.retrieval import rag_prompt

        if rag_tokens is not None and rag_tokens < 1:
            raise UserError("--rag-tokens must be at least 1")
        budget = rag_tokens or (cartridge.p if cartridge is not None else _cartridge_p(row))

        def rag_context(question: str) -> str:
            return rag_prompt(db, [row], question, budget, lm.tokenizer)[0]
        context = rag_context
    if "init" in modes:
        sampler = ChunkSampler(documents, None if lm.spec == "default" else lm.spec)
        how = (cartridge.meta.get("training") or {}).get("train", {}).get("init", "first")
        prefixes["init"] = init_embeddings(lm, sampler, cartridge.p, how)
    graded = [item for item in qa if item.get("expect")]
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    runner = _scoring_engine(lm, engine, model)
    try:
        for mode in modes:
            system = context_system_prompt(corpus_text) if mode == "icl" else None
            embeddings = prefixes.get(mode)
            if system is not None:
                n_system = len(chat_ids(lm.tokenizer, [{"role": "system", "content": system}], add_generation_prompt=False))
                if n_system + 512 > lm.max_positions:
                    skipped[mode] = (f"the corpus ({n_system:,} tokens) does not fit the model's context "
                                     f"({lm.max_positions:,} positions)")
                    continue
            asks = context if mode in RAG_MODES else None
            scorer = Scorer(runner, lm.tokenizer, embeddings=embeddings, system=system, context=asks)
            scores, generated = [], []
            for i, item in enumerate(qa):
                scores.append(scorer.nll(item["question"], item["answer"]))
                if on_progress:
                    on_progress(mode, i + 1, len(qa) + len(graded))
            for i, item in enumerate(graded):
                text = scorer.answer(item["question"], decoding)
                generated.append({"question": item["question"], "answer": text, "correct": contains_all(text, item["expect"])})
                if on_progress:
                    on_progress(mode, len(qa) + i + 1, len(qa) + len(graded))
            first_prompt = chat_ids(lm.tokenizer, scorer.messages(qa[0]["question"]), add_generation_prompt=True)
            prefix_len = embeddings.shape[0] if embeddings is not None else 0
            results[mode] = {
                "nll": round(sum(scores) / len(scores), 4),
                "kv_bytes": runner.kv_bytes(prefix_len + len(first_prompt)),
                "ttft_s": round(scorer.first_token_s(qa[0]["question"]), 4),
                "per_question": [round(s, 4) for s in scores],
            }
            if generated:
                results[mode]["accuracy"] = round(sum(g["correct"] for g in generated) / len(generated), 4)
                results[mode]["answers"] = generated
    finally:
        runner.close()  # a llama.cpp worker process ends here
    recovered = None
    if {"none", "icl", "cartridge"} <= set(results):
        gain = results["none"]["nll"] - results["icl"]["nll"]
        if gain > 0:
            recovered = round((results["none"]["nll"] - results["cartridge"]["nll"]) / gain, 4)
    return {"corpus": corpus["name"], "version": row["number"], "questions": len(qa), "graded": len(graded),
            "answer_tokens": decoding.max_new_tokens, "model": lm.spec,
            "engine": runner.name, "modes": results, "recovered": recovered,
            "skipped": skipped}
