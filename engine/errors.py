"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """Bad input or a state the user can fix; the message is shown as is."""


class CartridgeMismatch(UserError):
    """A cartridge was made for another base model, or is not a cartridge at all."""


def exit_with(main: Callable[[], int]) -> NoReturn:
    """Run a script's `main` and exit with its status; a UserError prints as one line and exits with 2, as
    the CLI does (for the benchmark scripts, which have no CLI around them)."""
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
