"""Picking a folder: the operating system's own dialog when the app runs on the user's desktop, else a
listing of subfolders for the in-page browser.

The dialog (tkinter's) runs in a helper process, so the UI server never blocks on it and a missing or
broken Tk only means falling back to the in-page browser.

    python -m app.folder_picker [START]   # opens the dialog; prints the chosen folder (nothing if cancelled)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DIALOG_TIMEOUT_S = 600


class NoDialog(Exception):
    """No desktop dialog here (no display, no Tk, or it failed): use the in-page browser."""


def has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pick_with_dialog(start: str | None = None) -> str | None:
    """The folder chosen in the system dialog, None when the user cancelled; NoDialog when there is none."""
    if not has_display():
        raise NoDialog("no desktop display")
    try:
        done = subprocess.run([sys.executable, "-m", "app.folder_picker", start or str(Path.home())],
                              capture_output=True, text=True, timeout=DIALOG_TIMEOUT_S,
                              cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoDialog(str(exc)) from None
    if done.returncode != 0:
        raise NoDialog(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "the dialog failed")
    return done.stdout.strip() or None


def subfolders(folder: str | Path) -> list[str]:
    """Names of the visible, readable subfolders of `folder`, sorted case-insensitively."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    names = []
    for entry in entries:
        try:
            if entry.is_dir() and not entry.name.startswith(".") and os.access(entry.path, os.R_OK | os.X_OK):
                names.append(entry.name)
        except OSError:
            continue
    return sorted(names, key=str.lower)


def _dialog(start: str) -> int:
    try:
        import tkinter
        from tkinter import filedialog
    except ImportError:
        print("tkinter is not installed", file=sys.stderr)
        return 3
    try:
        root = tkinter.Tk()
    except tkinter.TclError as exc:
        print(f"cannot open a window: {exc}", file=sys.stderr)
        return 3
    root.withdraw()
    root.attributes("-topmost", True)
    chosen = filedialog.askdirectory(initialdir=start, mustexist=True, title="Choose a folder for Cartridge Desktop")
    root.destroy()
    if chosen:
        print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(_dialog(sys.argv[1] if len(sys.argv) > 1 else str(Path.home())))
