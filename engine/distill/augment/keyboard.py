"""Keys next to a key on a US QWERTY keyboard, for fat-finger typos.

The layout is four rows per shift level. Rows are staggered: measured in key widths from the
left edge, the digit row starts at 0, the top letter row at 1.5 (``q`` sits between ``1`` and
``2``), the home row at 1.75 and the bottom row at 2.25. Two keys are neighbours when they are
side by side in a row, or in adjacent rows less than one key width apart horizontally. This
gives the usual picture: ``s`` touches ``a d w e z x``. A shifted key's neighbours are the
shifted neighbours (``S`` touches ``A D W E Z X``), as if shift were held down.
"""

from __future__ import annotations

from functools import cache

ROWS = ("`1234567890-=", "qwertyuiop[]\\", "asdfghjkl;'", "zxcvbnm,./")
SHIFTED_ROWS = ("~!@#$%^&*()_+", "QWERTYUIOP{}|", 'ASDFGHJKL:"', "ZXCVBNM<>?")
ROW_OFFSETS = (0.0, 1.5, 1.75, 2.25)


@cache
def _neighbours() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for rows in (ROWS, SHIFTED_ROWS):
        places = [(key, row, ROW_OFFSETS[row] + column)
                  for row, keys in enumerate(rows) for column, key in enumerate(keys)]
        for key, row, x in places:
            table[key] = tuple(
                other for other, other_row, other_x in places
                if other != key and (
                    (other_row == row and abs(other_x - x) == 1.0)
                    or (abs(other_row - row) == 1 and abs(other_x - x) < 1.0)
                )
            )
    return table


def neighbours(key: str) -> tuple[str, ...]:
    """The keys next to ``key`` (empty when ``key`` is not on the layout)."""
    return _neighbours().get(key, ())


def on_layout(key: str) -> bool:
    return key in _neighbours()
