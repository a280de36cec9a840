"""The one error the state store raises at start: a single line an operator can act on."""

from __future__ import annotations


class StateError(Exception):
    """The store cannot be used as configured. The message is one line, never a secret."""
