"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Bad input or a state the user can fix; the message is shown as is."""


class CartridgeMismatch(UserError):
    """A cartridge was made for another base model, or is not a cartridge at all."""
