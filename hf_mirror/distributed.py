"""The one place that decides the process state of a run: accelerate/torchrun process group, device, threads.

Every entry point (the CLI, the recipes, the pipeline, the index build) asks :func:`process_state`, so all of
them see the same launch: under ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine a plain
``PartialState()`` reports one process on each rank, while ``PartialState(cpu=True)`` reports both.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def process_state():
    """accelerate's ``PartialState`` of this launch (CPU processes use gloo when there is no GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not on_gpu())


def is_main_process() -> bool:
    return process_state().is_main_process


def launched_world() -> int:
    """The number of processes the launcher started (1 for a plain ``python``), without initialising anything."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (None: torch's choice), with a hint when the machine is oversubscribed."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    wanted = torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not on_gpu() and torch.get_num_threads() > 1 and busy + wanted > 1.5 * cores:
        logger.warning("This machine is busy (load %.1f on %d cores) and this run wants %d threads: threads that "
                       "spin against each other can be several times slower; try --threads 1.", busy, cores, wanted)
