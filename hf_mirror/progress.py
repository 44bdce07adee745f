"""Progress reporting: one bar on the main process, with documents and tokens summed over processes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from accelerate.utils import tqdm as _accelerate_tqdm


def progress_bar(disable: bool = False, **kwargs):
    """A tqdm bar on the main process; a silent one elsewhere or when ``disable``."""
    return _accelerate_tqdm(main_process_only=True, disable=disable, dynamic_ncols=True, **kwargs)


class ScanProgress:
    """Counts documents and tokens of a scan.

    Every process writes its counts to ``own`` (a small JSON file next to its shard) about once a second;
    the main process adds the counts it reads from ``peers`` to its own, so its bar shows the whole job's
    documents, documents/s and tokens/s, with an ETA when ``total`` (the corpus length) is known.
    """

    def __init__(self, own: Path | None = None, peers: Sequence[Path] = (), *, total: int | None = None,
                 show: bool = True, interval: float = 1.0) -> None:
        self.own, self.peers, self.interval = own, list(peers), interval
        self.docs = self.tokens = 0
        self._t0 = self._last = time.monotonic()
        self._bar = progress_bar(total=total, desc="scanning", unit="doc", disable=not show)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._last = now
        if self.own is not None:
            tmp = self.own.with_name(self.own.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"docs": self.docs, "tokens": self.tokens}))
            os.replace(tmp, self.own)
        docs, tokens = self.docs, self.tokens
        for peer in self.peers:
            try:
                counts = json.loads(peer.read_text())
            except (OSError, ValueError):
                continue
            docs, tokens = docs + counts["docs"], tokens + counts["tokens"]
        elapsed = max(now - self._t0, 1e-9)
        self._bar.n = docs
        self._bar.set_postfix(tok_s=f"{tokens / elapsed:.0f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._refresh(time.monotonic())
        self._bar.close()
