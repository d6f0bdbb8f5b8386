"""Peak memory of this process over a stretch of work (torch-free).

Two figures matter for a student whose memory layers are mapped from its weights file:

- resident memory (``VmRSS``): every page the process holds in RAM, file-backed or not;
- anonymous memory (``RssAnon``): the pages that are not backed by a file. These are the
  ones the OS can only move to swap; file-backed pages (a mapped ``model.safetensors``) can
  simply be dropped and read again, and are shared between processes mapping the same file.

:class:`PeakMemory` samples ``/proc/self/status`` from a background thread while its block
runs and keeps the peak of both. Where there is no ``/proc`` (macOS, Windows) the anonymous
figure is ``None`` and the resident one is the process's lifetime peak from
``resource.getrusage``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import TracebackType

STATUS = Path("/proc/self/status")
FIELDS = ("VmRSS", "RssAnon", "VmHWM")
INTERVAL_S = 0.02


def read_status(path: Path = STATUS) -> dict[str, float]:
    """``{field: MiB}`` for the fields of :data:`FIELDS` found in ``path`` ({} without it)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in FIELDS:
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                found[name] = int(parts[0]) / 1024
    return found


def lifetime_peak_rss_mb() -> float | None:
    """The process's peak resident memory so far (``ru_maxrss``), in MiB, or None."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class PeakMemory:
    """``with PeakMemory() as peak: ...``, then ``peak.peak_rss_mb`` and ``peak.peak_anon_mb``.

    Both are the highest values sampled (every ``interval`` seconds, and once at entry and
    exit) while the block ran, in MiB; ``hwm_mb`` is the kernel's own peak resident figure
    (``VmHWM``, over the process's whole life) read at exit. Each figure is ``None`` where the
    platform does not report it. The figures can be read while the block still runs.
    """

    def __init__(self, interval: float = INTERVAL_S, *, status: Path = STATUS) -> None:
        self.interval = interval
        self.status = status
        self.peak_rss_mb: float | None = None
        self.peak_anon_mb: float | None = None
        self.hwm_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Read the status file once and raise the peaks it exceeds."""
        values = read_status(self.status)
        rss, anon = values.get("VmRSS"), values.get("RssAnon")
        with self._lock:
            if rss is not None:
                self.peak_rss_mb = rss if self.peak_rss_mb is None else max(self.peak_rss_mb,
                                                                            rss)
            if anon is not None:
                self.peak_anon_mb = anon if self.peak_anon_mb is None else max(
                    self.peak_anon_mb, anon)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        if self.peak_rss_mb is not None:  # nothing to sample without /proc
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        self.hwm_mb = read_status(self.status).get("VmHWM")
        if self.peak_rss_mb is None:
            self.peak_rss_mb = lifetime_peak_rss_mb()

    def summary(self) -> str:
        """``peak memory 512 MiB (anonymous 130 MiB)``, leaving out what is unknown."""
        if self.peak_rss_mb is None:
            return "peak memory unknown"
        text = f"peak memory {self.peak_rss_mb:.0f} MiB"
        if self.peak_anon_mb is not None:
            text += f" (anonymous {self.peak_anon_mb:.0f} MiB)"
        return text
