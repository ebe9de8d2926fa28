"""Deprecation notices raised inside third-party calls the app cannot change, filtered narrowly.

PEFT (0.21) reads `is_gradient_checkpointing` and passes `past_key_values` to transformers (5.24), which
warns on every command. The app's own calls use the current names; only these exact messages are hidden.
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (r"`is_gradient_checkpointing` is deprecated", r"`past_key_values` is deprecated and will be removed")
_LOGGED = "`past_key_values`/`cache_params` are deprecated"


class _DropLogged(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _LOGGED not in record.getMessage()


def quiet_third_party() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logging.getLogger("transformers.utils.generic").addFilter(_DropLogged())
