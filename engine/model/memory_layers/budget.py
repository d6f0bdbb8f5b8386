"""How much memory a memory layer needs, checked before anything is allocated.

A typo such as ``num_subkeys=1000000`` (10^12 slots) or ``heads=1000000000`` would otherwise
make torch try to allocate terabytes: the process is killed, or the machine swaps for minutes.
Sizes are estimated from the config alone (parameters x 4 bytes, fp32) and compared against
this machine's RAM, so such settings fail in milliseconds with a line that says how much they
would need.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from engine.errors import InputError

if TYPE_CHECKING:
    from engine.model.memory_layers.config import AssociativeConfig, FeaturalConfig

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


def featural_parameters(config: FeaturalConfig) -> int:
    """Parameters of one featural memory layer (see ``FeaturalMemory.__init__``)."""
    hidden, slots, value_dim = config.hidden_size, config.num_slots, config.effective_value_dim
    if config.keys == "product":
        query = config.heads * config.query_dim
        count = hidden * query + query  # query projection
        count += config.heads * config.num_subkeys * config.query_dim  # two sub-key halves
        if config.gate:
            count += hidden * value_dim + value_dim
        count += value_dim * hidden + hidden  # output projection
    else:
        per_key = (hidden + 1) * (2 if config.gated else 1)
        count = slots * per_key + hidden  # keys, biases, output bias
    return count + slots * value_dim  # the value table


def associative_bytes(config: AssociativeConfig) -> int:
    """Bytes of one associative layer: its projections plus a store filled to capacity."""
    c = config
    projections = 2 * (c.hidden_size * c.heads * c.key_dim + c.heads * c.key_dim)
    projections += c.hidden_size * c.heads * c.value_dim + c.heads * c.value_dim
    projections += c.heads * c.value_dim * c.hidden_size + c.hidden_size
    entry = (c.key_dim + c.value_dim) * BYTES_PER_PARAMETER + ENTRY_STATS_BYTES
    return projections * BYTES_PER_PARAMETER + c.capacity * entry


def layer_bytes(config: FeaturalConfig | AssociativeConfig) -> int:
    from engine.model.memory_layers.config import FeaturalConfig

    if isinstance(config, FeaturalConfig):
        return featural_parameters(config) * BYTES_PER_PARAMETER
    return associative_bytes(config)


def check_fits(needed: int, what: str, fix: str) -> None:
    """Refuse ``needed`` bytes when they exceed this machine's RAM."""
    limit = memory_limit_bytes()
    if needed > limit:
        raise InputError(f"{what} needs about {format_bytes(needed)}, more than this "
                         f"machine's {format_bytes(limit)} of RAM; {fix}")


def check_layer_fits(config: FeaturalConfig | AssociativeConfig) -> None:
    """One layer alone must fit; :mod:`engine.distill.config` also checks a whole run."""
    from engine.model.memory_layers.config import FeaturalConfig

    if isinstance(config, FeaturalConfig):
        if config.keys == "product":
            what = (f"one featural memory layer ({config.heads} heads, "
                    f"{config.num_subkeys}^2 = {config.num_slots} slots)")
            fix = "give a smaller num_subkeys, heads, query_dim or value_dim"
        else:
            what = f"one flat-key memory layer ({config.slots} slots)"
            fix = "give fewer slots"
    else:
        what = (f"one associative memory layer ({config.heads} heads, capacity "
                f"{config.capacity})")
        fix = "give a smaller capacity, heads, key_dim or value_dim"
    check_fits(layer_bytes(config), what, fix)
