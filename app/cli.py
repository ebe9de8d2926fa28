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
    from engine.ingest import ScanOptions, ingest

    options = None
    if args.max_file_bytes or args.max_total_bytes or args.allow_secrets:
        options = ScanOptions()
        options.max_file_bytes = args.max_file_bytes or options.max_file_bytes
        options.max_total_bytes = args.max_total_bytes or options.max_total_bytes
        options.allow_secrets = args.allow_secrets
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
    from engine import registry

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
    from engine import registry

    db = registry.open_registry()
    corpus = registry.get_corpus(db, args.corpus)
    versions = [{"number": v["number"], "status": v["status"], "files": v["files"], "tokens": v["tokens"],
                 "created": v["created"], "manifest_hash": v["manifest_hash"], "cartridge": v["cartridge"],
                 "current": v["number"] == corpus["current_version"], "error": v["error"]}
                for v in registry.list_versions(db, corpus["id"])]
    if args.json:
        _print_json({"corpus": corpus["name"], "versions": versions})
        return
    for v in versions:
        mark = "*" if v["current"] else " "
        print(f"{mark} v{v['number']:<4} {v['status']:<11} {v['files']:>6} files {v['tokens']:>9,} tokens  "
              f"{_when(v['created'])}")


# -- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cartridge", description="Train cartridges for your folders and chat with them, locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("ingest", help="scan a folder and record a version of its corpus")
    p.add_argument("path")
    p.add_argument("--name", help="corpus name (default: the folder's name)")
    p.add_argument("--ignore", action="append", metavar="PATTERN",
                   help="gitignore-style pattern to exclude (repeatable; replaces the stored list)")
    p.add_argument("--max-file-bytes", type=int, help="skip files larger than this (default 1,000,000)")
    p.add_argument("--max-total-bytes", type=int, help="stop including files past this total (default 50,000,000)")
    p.add_argument("--allow-secrets", action="store_true", help="include secret-looking files (.env, keys, *.pem)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("list", help="list corpora")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("versions", help="list the versions of a corpus")
    p.add_argument("corpus")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
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
