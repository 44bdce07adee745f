"""One error hierarchy: each message names the problem and the fix; the CLI turns them into exit codes.

- :class:`InputError` (exit 2): bad input the user can fix (corpus, probes, model, options, a run directory
  that belongs to another run or is damaged beyond repair).
- :class:`RunError` (exit 1): the run itself failed (a non-finite loss, a cache that no longer matches).
"""


class HfMirrorError(Exception):
    """Base of every error hf_mirror raises on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(HfMirrorError, ValueError):
    """Bad user input (corpus, probes, model, options or output directory)."""

    exit_code = 2


class RunError(HfMirrorError, RuntimeError):
    """The run failed after its inputs were accepted (finished work is kept; the message says how to resume)."""

    exit_code = 1


class ScoreError(RunError):
    """A non-finite loss during fitting or scanning."""


class StateError(InputError):
    """A file that a run reads back (checkpoint, cache, index, adapter) is damaged or belongs to another run."""
