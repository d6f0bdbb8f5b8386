"""How much memory there is, checked before anything large is allocated.

A typo such as ``num_subkeys=1000000`` (10^12 slots) or ``heads=1000000000`` would otherwise
make torch try to allocate terabytes: the process is killed, or the machine swaps for minutes.
Each config estimates its own size from its settings alone (parameters x 4 bytes, fp32:
``FeaturalConfig.memory_bytes``, ``engine.model.model_files.model_parameters``) and
:func:`check_fits` compares that against this machine's RAM, so such settings fail in
milliseconds with a line that says how much they would need.
"""

from __future__ import annotations

import os

from engine.errors import InputError, MindsetError

BYTES_PER_PARAMETER = 4  # fp32: layers are built in fp32 and cast afterwards
FALLBACK_LIMIT = 64 << 30  # when the machine's RAM cannot be read: generous, yet finite
ENTRY_STATS_BYTES = 24  # LRFU statistics per associative entry (crf, last tick, hits)


def memory_limit_bytes() -> int:
    """This machine's physical RAM: no run can use more, whatever swap says."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_LIMIT
    if pages <= 0 or page_size <= 0:
        return FALLBACK_LIMIT
    return int(pages * page_size)


def format_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'; astronomically large counts stay readable ('2.3e+06 TiB')."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB" if value < 1e5 else f"{value:.1e} TiB"


def check_fits(needed: int, what: str, fix: str,
               error: type[MindsetError] = InputError) -> None:
    """Refuse ``needed`` bytes when they exceed this machine's RAM."""
    limit = memory_limit_bytes()
    if needed > limit:
        raise error(f"{what} needs about {format_bytes(needed)}, more than this "
                         f"machine's {format_bytes(limit)} of RAM; {fix}")
