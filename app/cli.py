"""The `cartridge` command line: parses options, calls engine functions, prints text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter

from engine.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2, as for every other bad input
        raise UserError(f"{self.prog}: {message}")


def _print_json(doc) -> None:
    sys.stdout.write(json.dumps(doc, indent=None, default=str) + "\n")


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


# -- commands --------------------------------------------------------------------------------------

def cmd_ingest(args) -> None:
    from engine.corpus.ingest import ingest

    for flag, value in (("--max-file-bytes", args.max_file_bytes), ("--max-total-bytes", args.max_total_bytes)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1")
    given = {"max_file_bytes": args.max_file_bytes, "max_total_bytes": args.max_total_bytes,
             "allow_secrets": args.allow_secrets}
    options = {key: value for key, value in given.items() if value is not None}  # the rest stay as stored
    result = ingest(args.path, name=args.name, ignore=args.ignore, options=options,
                    progress_bar=not args.json and sys.stderr.isatty())
    if args.json:
        _print_json(result.to_json())
        return
    skipped = [f for f in result.files if f.status == "skipped"]
    state = "new version" if result.changed else "unchanged"
    print(f"{result.corpus['name']}: version {result.version['number']} ({state}) — "
          f"{len(result.included)} files included, {len(skipped)} skipped, {result.version['tokens']:,} tokens")
    for reason, count in Counter(f.reason for f in skipped).most_common():
        print(f"  skipped {count:>5}  {reason}")


def cmd_list(args) -> None:
    from engine.store import registry

    db = registry.open_registry()
    corpora = []
    for corpus in registry.list_corpora(db):
        versions = registry.list_versions(db, corpus["id"])
        latest = versions[-1] if versions else None
        corpora.append({
            "name": corpus["name"], "root": corpus["root"], "versions": len(versions),
            "current_version": corpus["current_version"], "latest_version": latest and latest["number"],
            "status": latest and latest["status"], "tokens": latest and latest["tokens"],
            "files": latest and latest["files"], "watch": corpus["watch"],
        })
    if args.json:
        _print_json({"corpora": corpora})
        return
    if not corpora:
        print("no corpora yet: run `cartridge ingest PATH`")
    for c in corpora:
        current = c["current_version"] if c["current_version"] is not None else "-"
        print(f"{c['name']:<24} v{c['latest_version']} {c['status']:<11} current v{current}  "
              f"{c['files']} files  {c['tokens']:,} tokens  {c['root']}")


def cmd_versions(args) -> None:
    from engine.store import registry

    db = registry.open_registry()
    corpus = registry.get_corpus(db, args.corpus)
    if args.make_current is not None:
        registry.set_current_version(db, corpus, args.make_current)
        corpus = registry.get_corpus(db, args.corpus)
    versions = [{"number": v["number"], "status": v["status"], "files": v["files"], "tokens": v["tokens"],
                 "created": v["created"], "manifest_hash": v["manifest_hash"], "cartridge": v["cartridge"],
                 "current": v["number"] == corpus["current_version"], "error": v["error"],
                 "heldout": v.get("heldout")}
                for v in registry.list_versions(db, corpus["id"])]
    if args.json:
        _print_json({"corpus": corpus["name"], "versions": versions})
        return
    for v in versions:
        mark = "*" if v["current"] else " "
        score = f"held-out {v['heldout']:.0%}" if v["heldout"] is not None else ""
        print(f"{mark} v{v['number']:<4} {v['status']:<11} {v['files']:>6} files {v['tokens']:>9,} tokens  "
              f"{_when(v['created'])}  {score}".rstrip())


def _shared_train_overrides(args) -> dict:
    """The settings of `_add_train_flags`, which `train` and `watch` both take."""
    return {"p": args.tokens, "conversations": args.conversations, "steps": args.steps, "batch_size": args.batch_size,
            "chunk_tokens": args.chunk_tokens, "max_answer_tokens": args.answer_tokens}


def _train_overrides(args) -> dict:
    return {**_shared_train_overrides(args), "lr": args.lr, "loss_on": args.loss_on, "seed": args.seed,
            "teacher": args.teacher, "lr_schedule": args.lr_schedule, "init": args.init, "verbatim": args.verbatim}


class _Bars:
    """Training progress on stderr: tqdm bars on a terminal (with --json too), one-line phase updates
    (each phase, then every tenth of it) when stderr is a file or a pipe."""

    def __init__(self, terminal: bool):
        self.terminal, self.bar, self.phase, self.tenth = terminal, None, None, -1

    def __call__(self, progress) -> None:
        if progress.phase != self.phase:
            self.close()
            self.phase, self.bar, self.tenth = progress.phase, None, -1
            if self.terminal and progress.phase in ("synthesis", "training"):
                from tqdm import tqdm

                unit = " conv" if progress.phase == "synthesis" else " step"
                self.bar = tqdm(total=progress.total, desc=progress.phase, unit=unit, file=sys.stderr)
            elif progress.message:
                print(progress.message, file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.n = progress.done
            if progress.phase == "training":
                self.bar.set_postfix(loss=f"{progress.loss:.4f}", tok_s=f"{progress.rate:.0f}", refresh=False)
            self.bar.refresh()
        elif progress.phase in ("synthesis", "training") and progress.total:
            tenth = 10 * progress.done // progress.total
            if tenth > self.tenth:
                self.tenth = tenth
                what = "conversations" if progress.phase == "synthesis" else "steps"
                loss = f", loss {progress.loss:.4f}" if progress.phase == "training" and progress.loss else ""
                eta = f", {progress.eta_s / 60:.1f} min left" if progress.eta_s else ""
                print(f"{progress.phase}: {progress.done}/{progress.total} {what}{loss}{eta}", file=sys.stderr,
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_train(args) -> None:
    from engine.training import pipeline
    from engine.store import registry

    db = registry.open_registry()
    bars = _Bars(sys.stderr.isatty())
    try:
        outcome = pipeline.train(db, args.corpus, version=args.version, preset=args.preset, model=args.model,
                                 device=args.device, resume=args.resume, on_progress=bars, nproc=args.nproc,
                                 synthesis_server=args.synthesis_server, server_model=args.server_model,
                                 concurrency=args.concurrency, server_timeout=args.server_timeout,
                                 **_train_overrides(args))
    except KeyboardInterrupt:
        bars.close()
        raise UserError(f"training stopped; continue with `cartridge train {args.corpus} --resume`") from None
    bars.close()
    if args.json:
        _print_json(outcome.to_json())
    else:
        print(f"{outcome.corpus} v{outcome.version}: cartridge of {outcome.tokens} tokens from {outcome.conversations} "
              f"conversations, {outcome.steps} steps, loss {outcome.loss_first:.4f} -> {outcome.loss_last:.4f}, "
              f"{outcome.seconds:.0f} s\n  {outcome.cartridge}")
        h = outcome.heldout
        if h and h["score"] is None:
            print(f"  no held-out score: on its {h['conversations']} unseen conversations the folder gave the teacher "
                  f"no clear advantage (answer NLL none {h['nll_none']:.3f}, teacher {h['nll_teacher']:.3f})")
        elif h:
            print(f"  held-out score {h['score']:.0%} of the teacher's advantage on {h['conversations']} unseen "
                  f"conversations (untrained: {h['init_score']:.0%}; answer NLL none {h['nll_none']:.3f}, "
                  f"cartridge {h['nll_cartridge']:.3f}, teacher {h['nll_teacher']:.3f})")
        if not outcome.current:
            print(f"  not made current: {outcome.not_current}", file=sys.stderr)


def cmd_llama_server(args) -> None:
    import signal
    import subprocess

    from engine.engines import llama_server
    from engine.store.paths import default_model_path

    from app.ports import port_is_free

    if not args.build_only and not port_is_free(args.port):
        raise UserError(f"port {args.port} is in use; pick another with --port")
    binary = llama_server.ensure_built(say=lambda message: print(message, file=sys.stderr, flush=True))
    if args.build_only:
        print(binary)
        return
    url = f"http://127.0.0.1:{args.port}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated command stops its server too
    command = llama_server.server_command(default_model_path(), port=args.port, parallel=args.parallel, ctx=args.ctx)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL if not args.verbose else None,
                               stderr=subprocess.DEVNULL if not args.verbose else None)
    try:
        llama_server.wait_until_ready(url, process)
        print(f"llama-server serves the bundled model at {url} ({args.parallel} requests at a time; Ctrl-C stops it)\n"
              f"  cartridge train CORPUS --synthesis-server {url} --concurrency {args.parallel}", flush=True)
        process.wait()
        if process.returncode:
            raise UserError(f"llama-server stopped with code {process.returncode}")
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def cmd_chat(args) -> None:
    from engine.serve import inference
    from engine.store import registry

    db = registry.open_registry()
    mode = inference.default_mode(db, args.corpus, version=args.version) if args.mode == "auto" else args.mode
    chat = inference.open_chat(db, args.corpus, version=args.version, mode=mode, model=args.model,
                               device=args.device, engine=args.engine, rag_tokens=args.rag_tokens)
    if args.mode == "auto" and mode == "cartridge+rag" and not args.json:
        print("cartridge+rag: a folder longer than the model's context answers better with retrieved passages "
              "beside its cartridge (--mode cartridge for the cartridge alone)", file=sys.stderr)
    if args.prompt is not None:
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        reply = chat.reply([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_tokens,
                           temperature=args.temperature, on_text=stream)
        if args.json:
            _print_json(reply.to_json())
        else:
            print(f"\n[{reply.mode}, first token {reply.ttft_s:.2f} s, {reply.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
            _print_sources(reply)
        return
    names = ", ".join(args.corpus)
    print(f"chatting with {names} ({mode}); an empty line or Ctrl-D ends the chat", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question:
            break
        history.append({"role": "user", "content": question})
        print("model> ", end="", flush=True)
        reply = chat.reply(history, max_new_tokens=args.max_tokens, temperature=args.temperature,
                           on_text=lambda piece: print(piece, end="", flush=True))
        print(f"\n[{reply.ttft_s:.2f} s to first token, {reply.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        _print_sources(reply)
        history.append({"role": "assistant", "content": reply.answer})


def _print_sources(reply) -> None:
    if reply.mode in ("rag", "cartridge+rag"):
        from engine.corpus.retrieval import source_label

        used = ", ".join(source_label(s) for s in reply.sources) or "none found"
        print(f"[sources: {used}]", file=sys.stderr)


def cmd_eval(args) -> None:
    from engine.serve import evaluate
    from engine.store import registry

    db = registry.open_registry()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = evaluate.evaluate(db, args.corpus, args.qa, modes=modes, version=args.version, model=args.model,
                               device=args.device, engine=args.engine, rag_tokens=args.rag_tokens)
    if args.json:
        _print_json(result)
        return
    graded = f", {result['graded']} with expected strings (answers up to {result['answer_tokens']} tokens)" \
        if result["graded"] else ""
    print(f"{result['corpus']} v{result['version']}: {result['questions']} questions{graded}")
    for mode, why in result.get("skipped", {}).items():
        print(f"  {mode:<13} skipped: {why}")
    for mode, figures in result["modes"].items():
        accuracy = f"   accuracy {figures['accuracy']:6.1%}" if "accuracy" in figures else ""
        print(f"  {mode:<13} answer NLL {figures['nll']:.4f}{accuracy}   KV {figures['kv_bytes'] / 1e6:8.2f} MB   "
              f"first token {figures['ttft_s']:.3f} s")
    if result["recovered"] is not None:
        print(f"  recovered {result['recovered']:.1%} of in-context learning's gain")


def cmd_remove(args) -> None:
    from engine.store import registry
    from engine.training.pipeline import remove_corpus

    db = registry.open_registry()
    removed = remove_corpus(db, args.corpus)
    if args.json:
        _print_json(removed)
    else:
        print(f"removed {removed['name']} from the library and deleted its conversations and cartridges "
              f"(your folder {removed['root']} is untouched)")
        if not removed["scrubbed"]:
            print("note: another process is reading the registry; the removed text leaves its write-ahead log "
                  "once that process closes it", file=sys.stderr)


def cmd_watch(args) -> None:
    from engine.store import registry
    from engine.jobs.watcher import set_watch

    db = registry.open_registry()
    for name in args.corpus:
        registry.get_corpus(db, name)  # every name is checked before any switch changes
    if args.off:
        if not args.corpus:
            raise UserError("name the corpora to stop watching: cartridge watch --off CORPUS")
        corpora = [set_watch(db, name, False) for name in args.corpus]
        if args.json:
            _print_json({"corpora": [{"name": c["name"], "watch": c["watch"]} for c in corpora]})
        else:
            print(f"watch switched off for {', '.join(c['name'] for c in corpora)}")
        return
    if not args.corpus and not any(c["watch"] for c in registry.list_corpora(db)):
        raise UserError("no corpus has watch switched on: run `cartridge watch CORPUS` to watch one")

    from engine.jobs.queue import TrainingQueue
    from engine.training.pipeline import make_config
    from engine.jobs.watcher import start_watchers

    overrides = _shared_train_overrides(args)
    make_config(args.preset, **overrides)  # bad settings fail here, not at the first retrain
    for name in args.corpus:
        set_watch(db, name, True)
    watched = [c for c in registry.list_corpora(db) if c["watch"]]
    first_event = max((e["id"] for e in registry.list_events(db, limit=1)), default=0)
    queue = TrainingQueue()
    service = start_watchers(queue, quiet_seconds=args.quiet_seconds, rescan_seconds=args.rescan_seconds,
                             max_wait_seconds=args.max_wait_seconds, preset=args.preset, **overrides)
    ids = {c["id"]: c["name"] for c in watched}
    if not args.json:
        for c in watched:
            print(f"watching {c['name']} ({c['root']})", file=sys.stderr)
        print(f"a change is acted on after {args.quiet_seconds:g} s of quiet (at most {args.max_wait_seconds:g} s "
              f"after it); full rescan every {args.rescan_seconds:g} s; Ctrl-C stops", file=sys.stderr)
    seen, events = first_event, []
    try:
        while True:
            time.sleep(1.0)
            new = [e for e in reversed(registry.list_events(db, limit=200)) if e["id"] > seen]
            for event in new:
                seen = event["id"]
                if event["corpus_id"] not in ids:
                    continue
                events.append({**event, "corpus": ids[event["corpus_id"]],
                               "data": json.loads(event["data"]) if event["data"] else None})
                if not args.json:
                    print(f"{time.strftime('%H:%M:%S', time.localtime(event['created']))} "
                          f"{ids[event['corpus_id']]}: {event['message']}", flush=True)
    except KeyboardInterrupt:
        running = queue.current
        if running is not None and running.source == "watch":
            if not args.json:
                print(f"stopping the retrain of {running.corpus}; the next `cartridge watch` continues it",
                      file=sys.stderr)
            queue.cancel(running.id)
            queue.wait(running.id, timeout=60)
    finally:
        status = service.status()
        service.stop()
    if args.json:
        _print_json({"watched": [c["name"] for c in watched], "status": status, "events": events})


def cmd_ui(args) -> None:
    from app.ui import launch

    launch(port=args.port, open_browser=not args.no_browser, share=args.share)


# -- parser ----------------------------------------------------------------------------------------

def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The training settings shared by `train` and `watch`."""
    p.add_argument("--preset", default="quick",
                   help="demo (CPU, ~2 min, to see the loop), quick (CPU, minutes), standard or thorough (GPU)")
    p.add_argument("--tokens", type=int, metavar="P", help="virtual tokens in the cartridge")
    p.add_argument("--conversations", type=int, metavar="N", help="self-study conversations to synthesize")
    p.add_argument("--steps", type=int, metavar="S", help="optimizer steps (default: the preset's passes over the conversations)")
    p.add_argument("--batch-size", type=int, help="conversations per step")
    p.add_argument("--chunk-tokens", type=int, help="corpus chunk size shown during self-study")
    p.add_argument("--answer-tokens", type=int, metavar="N",
                   help="longest self-study answer (default: the preset's; shorter is faster, longer teaches more)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cartridge", description="Train cartridges for your folders and chat with them, locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ingest", help="scan a folder and record a version of its corpus")
    p.add_argument("path")
    p.add_argument("--name", help="corpus name (default: the folder's name)")
    p.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="gitignore-style pattern to exclude (repeatable; replaces the stored list)")
    p.add_argument("--max-file-bytes", type=int,
                   help="skip files larger than this (default 1,000,000; kept for later scans)")
    p.add_argument("--max-total-bytes", type=int,
                   help="stop including files past this total (default 50,000,000; kept for later scans)")
    p.add_argument("--allow-secrets", action=argparse.BooleanOptionalAction, default=None,
                   help="include secret-looking files (.env, keys, *.pem); kept for later scans until --no-allow-secrets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("list", help="list corpora")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("versions", help="list the versions of a corpus (and choose the one that serves)")
    p.add_argument("corpus")
    p.add_argument("--make-current", type=int, metavar="N", help="make ready version N the one chat and eval use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("train", help="train a cartridge for a corpus (self-study + distillation)")
    p.add_argument("corpus")
    p.add_argument("--version", type=int, help="version to train (default: the latest)")
    _add_train_flags(p)
    p.add_argument("--lr", type=float, help="learning rate (default: the preset's, 2e-2)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="learning-rate schedule (default: the preset's; quick cosine, the others constant)")
    p.add_argument("--loss-on", choices=["assistant", "all"], help="supervise assistant tokens (default) or all")
    p.add_argument("--teacher", choices=["corpus", "chunk"],
                   help="what the self-study teacher sees: the whole corpus (a window when too long) or the chunk")
    p.add_argument("--init", choices=["first", "spread", "attention"],
                   help="start from the corpus's first p tokens, from excerpts spread across it, or from the KV of "
                        "the corpus read whole (in windows beyond the model's context), the p positions each head attends "
                        "to most (quick's default)")
    p.add_argument("--verbatim", type=float, metavar="X",
                   help="quoting conversations (the folder's own words) trained per self-study one (default: the "
                        "preset's; 0 for none)")
    p.add_argument("--seed", type=int)
    p.add_argument("--model", help="Hugging Face id or local folder (default: the bundled SmolLM2 GGUF)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of this version")
    p.add_argument("--nproc", type=int, choices=range(1, 65), default=1, metavar="N",
                   help="train in N processes with torch DDP (gloo on CPUs, NCCL with one GPU each); "
                        "self-study stays in one")
    p.add_argument("--synthesis-server", metavar="URL",
                   help="make the self-study conversations on this inference server (llama.cpp's llama-server, vLLM "
                        "or SGLang) serving the training model")
    p.add_argument("--server-model", metavar="NAME", help="the model to ask for, when the server serves several")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="conversations in flight on the server at a time (default 4)")
    p.add_argument("--server-timeout", type=float, metavar="SECONDS",
                   help="how long to wait for one answer of the server before trying again (default 120)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("llama-server", help="serve the bundled model with llama.cpp's llama-server on 127.0.0.1 "
                                            "(for --synthesis-server; built once, about 8 minutes)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", type=int, default=4, metavar="N", help="requests served at a time (default 4)")
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="context tokens per request (default 4096)")
    p.add_argument("--build-only", action="store_true", help="build llama-server if needed, print its path and exit")
    p.add_argument("--verbose", action="store_true", help="show llama-server's own log")
    p.set_defaults(func=cmd_llama_server)

    p = sub.add_parser("chat", help="chat with one or more corpora (cartridges composed)")
    p.add_argument("corpus", nargs="+")
    p.add_argument("--version", type=int, help="version to use (one corpus only; default: current)")
    p.add_argument("--mode", default="auto", choices=["auto", "cartridge", "icl", "none", "rag", "cartridge+rag"],
                   help="rag: passages found for each question; cartridge+rag: the cartridge plus those passages; "
                        "auto (default): cartridge, or cartridge+rag for a folder longer than the model's context")
    p.add_argument("--rag-tokens", type=int, metavar="N",
                   help="token budget of the retrieved passages (default: the cartridge's p)")
    p.add_argument("--prompt", help="ask one question and exit (default: interactive)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--model", help="override the model (default: the one the cartridge was trained on)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--engine", choices=["llama.cpp", "torch"], help="inference engine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="score gold answers with none / icl / cartridge / rag")
    p.add_argument("corpus")
    p.add_argument("--qa", required=True, help="JSON Lines of {\"question\", \"answer\"}")
    p.add_argument("--modes", default="none,icl,cartridge",
                   help="comma-separated, from none, icl, init (the untrained cartridge), cartridge, rag and "
                        "cartridge+rag")
    p.add_argument("--rag-tokens", type=int, metavar="N",
                   help="token budget of the retrieved passages (default: the cartridge's p)")
    p.add_argument("--version", type=int)
    p.add_argument("--model")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--engine", choices=["llama.cpp", "torch"], help="inference engine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("remove", help="remove a corpus from the library, with its conversations and cartridges")
    p.add_argument("corpus")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("watch", help="retrain cartridges when their folders change (runs until Ctrl-C)")
    p.add_argument("corpus", nargs="*",
                   help="corpora to watch; their watch switch stays on (default: every corpus switched on)")
    p.add_argument("--off", action="store_true", help="switch watch off for the named corpora and exit")
    p.add_argument("--quiet-seconds", type=float, default=60.0, metavar="S",
                   help="act on changes once the folder has been quiet this long (default 60)")
    p.add_argument("--max-wait-seconds", type=float, default=600.0, metavar="S",
                   help="act on a change within this long even if the folder never goes quiet (default 600)")
    p.add_argument("--rescan-seconds", type=float, default=600.0, metavar="S",
                   help="also rescan every folder this often, for changes the watcher missed (default 600)")
    _add_train_flags(p)
    p.add_argument("--json", action="store_true", help="on exit, print the events and status as one JSON document")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("ui", help="start the desktop app in your browser (the default with no command)")
    p.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 7860 or the next free one)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.quiet import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):  # no command: start the app
            args = parser.parse_args(["ui"])
        args.func(args)
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
