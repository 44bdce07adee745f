"""Errors raised for bad input: each message names the problem and the fix."""


class InputError(ValueError):
    """Bad user input (corpus, probes, model or options)."""


class ScoreError(RuntimeError):
    """A non-finite loss during fitting or scanning."""
