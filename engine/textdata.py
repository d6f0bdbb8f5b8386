"""Reading user text files with clear errors."""

from __future__ import annotations

from pathlib import Path

from engine.errors import InputError


def read_text_file(path: str | Path) -> str:
    """The UTF-8 contents of ``path``; a clear error for a missing, binary or empty file."""
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"{file}: no such file; give the path of a UTF-8 text file")
    if file.is_dir():
        raise InputError(f"{file} is a directory; give the path of a UTF-8 text file")
    if not file.is_file():  # a device or a pipe (/dev/zero) would be read forever
        raise InputError(f"{file} is not a regular file; give the path of a UTF-8 text file")
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{file} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8"
        ) from exc
    except OSError as exc:
        raise InputError(f"{file}: cannot read ({exc.strerror})") from exc
    if not text.strip():
        raise InputError(f"{file} is empty; give a file with some text in it")
    return text


def utf8_problem(text: str) -> str | None:
    """What keeps ``text`` from being UTF-8, e.g. ``byte 0xff at character 3`` (an undecodable
    byte carried by ``surrogateescape``, as argv and file names do) or ``a lone surrogate
    U+D800 at character 1`` (``"\\ud800"`` in JSON); None when it is valid."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        found = (f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF
                 else f"a lone surrogate U+{char:04X}")
        return f"{found} at character {exc.start}"
    return None
