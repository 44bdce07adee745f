"""Safe terminal text: control characters from documents, probes and ids are shown escaped, never sent raw.

A corpus document (or a probe, or an id) can hold ESC, CSI, carriage returns or bidi overrides that would
recolour, move the cursor, retitle or visually reorder the user's terminal. :func:`printable` turns each into
a visible escape (``\\x1b``, ``\\u202e``); :class:`EscapeControl` does the same to log records.
"""

from __future__ import annotations

import logging
import re

# C0 controls but tab and newline, DEL, C1 controls, bidi embeddings/overrides/isolates
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, newlines: bool = True) -> str:
    """``text`` with every control character escaped (``\\x1b``); tab and newline kept unless ``newlines=False``."""
    out = _CONTROL.sub(_escape, str(text))
    return out if newlines else out.replace("\n", "\\n").replace("\t", "\\t")


class EscapeControl(logging.Filter):
    """A logging filter that escapes control characters in each record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def escape_log_output(logger: logging.Logger | None = None) -> None:
    """Add :class:`EscapeControl` to the handlers of ``logger`` (default: the root logger), once each."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapeControl) for f in handler.filters):
            handler.addFilter(EscapeControl())
