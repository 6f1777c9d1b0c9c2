"""Progress of data preparation: files, bytes and tokens done out of the total.

On a terminal (``forge train``) it is a tqdm bar over the bytes, with the files and tokens beside
it; in a pod (no terminal) a log line every ``LOG_SECONDS``, so ``kubectl logs`` shows how far the
tokenization of a large corpus is.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("forge.trainer")

LOG_SECONDS = 30.0


class PrepareMeter:
    def __init__(self, what: str, files: int, total_bytes: int, *, stream: TextIO | None = None,
                 bar: bool | None = None, log_seconds: float = LOG_SECONDS) -> None:
        self.what, self.files, self.total_bytes = what, files, total_bytes
        self.done_files = self.done_bytes = self.tokens = 0
        self.log_seconds = log_seconds
        stream = stream or sys.stderr
        self._started = self._logged = time.monotonic()
        self._bar = None
        if bar if bar is not None else stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                             file=stream, dynamic_ncols=True, leave=False)

    def add(self, files: int = 0, size: int = 0, tokens: int = 0) -> None:
        """``files`` more files read (``size`` bytes), ``tokens`` more tokens written."""
        self.done_files += files
        self.done_bytes += size
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(size)
            self._bar.set_postfix(files=f"{self.done_files}/{self.files}", tokens=f"{self.tokens:,}", refresh=False)
        elif time.monotonic() - self._logged >= self.log_seconds:
            self._logged = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (f"{self.what}: {self.done_files}/{self.files} files, {self.done_bytes / 1e6:,.1f} of "
                f"{self.total_bytes / 1e6:,.1f} MB ({pct:.0f}%), {self.tokens:,} tokens, "
                f"{time.monotonic() - self._started:.0f}s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def meter_for(what: str, listing, sources) -> PrepareMeter:
    """A meter over every file of ``sources`` (their listing: name -> [(SourceFile, digest)])."""
    files = [f for src in sources for f, _ in listing[src.name]]
    return PrepareMeter(what, len(files), sum(f.size for f in files))
