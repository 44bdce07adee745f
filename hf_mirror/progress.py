"""Progress bars shown on the main process only (accelerate's tqdm wrapper)."""

from __future__ import annotations

from accelerate.utils import tqdm as _accelerate_tqdm


def progress_bar(disable: bool = False, **kwargs):
    """A tqdm bar on the main process; a silent one elsewhere or when ``disable``."""
    return _accelerate_tqdm(main_process_only=True, disable=disable, dynamic_ncols=True, **kwargs)
