"""Helpers shared by the tabs of the desktop UI: registry access, error display, formatting."""

from __future__ import annotations

import functools
import html
import inspect
import sys
import time
import traceback
from contextlib import contextmanager

import gradio as gr

from engine.store import library, registry
from engine.errors import UserError


@contextmanager
def open_db():
    """A registry connection for one request (connections are not shared between threads)."""
    db = registry.open_registry()
    try:
        yield db
    finally:
        db.close()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return library.friendly_error(str(exc))
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory: try a smaller p (virtual tokens) or batch size, or close other programs"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected error ({type(exc).__name__}{': ' + first if first else ''})"


def as_gr_error(exc: BaseException) -> gr.Error:
    if not isinstance(exc, (UserError, MemoryError)):
        traceback.print_exception(exc, file=sys.stderr)
    return gr.Error(html.escape(error_text(exc), quote=False), duration=None, print_exception=False)


def guarded(fn):
    """Show UserError (and anything unexpected) as a readable message in the page, never a stack trace."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise as_gr_error(exc) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise as_gr_error(exc) from None
    return wrapper


def warn(message: str) -> None:
    gr.Warning(html.escape(message, quote=False))


# -- choices ---------------------------------------------------------------------------------------

def corpus_names() -> list[str]:
    with open_db() as db:
        return [c["name"] for c in registry.list_corpora(db)]


def keep(value, choices: list):
    """`value` if it is still among `choices` (a list of values or (label, value) pairs), else None."""
    values = [c[1] if isinstance(c, tuple) else c for c in choices]
    if isinstance(value, list):
        return [v for v in value if v in values]
    return value if value in values else None


def corpus_dropdown(value=None, *, default_first: bool = True) -> dict:
    names = corpus_names()
    chosen = keep(value, names)
    if chosen is None and default_first and names and not isinstance(value, list):
        chosen = names[0]
    return gr.update(choices=names, value=chosen)


def version_choices(corpus: str | None, *, label_current: str = "current", ready_only: bool = False) -> list:
    """[(label, value)] for a version dropdown: "current" (value "") then each version, newest first."""
    choices = [(label_current, "")]
    if not corpus:
        return choices
    with open_db() as db:
        if registry.find_corpus(db, name=corpus) is None:
            return choices
        for v in library.version_rows(db, corpus):
            if ready_only and v["status"] != "ready":
                continue
            mark = " (current)" if v["current"] else ""
            choices.append((f"v{v['number']} · {v['status']}{mark}", str(v["number"])))
    return choices


def parse_version(value) -> int | None:
    if value in (None, "", "current", "latest"):
        return None
    try:
        return int(str(value).lstrip("v"))
    except ValueError:
        raise UserError(f"not a version number: {value!r}") from None


# -- formatting ------------------------------------------------------------------------------------

def when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def duration(seconds) -> str:
    if seconds is None:
        return "…"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def number(value) -> str:
    return "" if value is None else f"{value:,}"
