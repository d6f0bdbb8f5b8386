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


TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".text", ".org", ".tex", ".csv", ".json",
                 ".html", ".htm", ".xml", ".yaml", ".yml", ".py", ".log"}
MAX_FILES = 10_000


def text_files(path: Path) -> list[Path]:
    """The text files to read under ``path`` (itself, if a file), sorted; a clear error
    before any work for a missing path, a binary file or a folder without text."""
    path = path.expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; give a text file or a folder of "
                         "notes")
    if path.is_file():
        read_text_file(path)  # refuses binary, non-UTF-8 and empty files
        return [path]
    if not path.is_dir():
        raise InputError(f"{path} is not a regular file or folder; give a text file or a "
                         "folder of notes")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower()
                   in TEXT_SUFFIXES and not any(part.startswith(".")
                                                for part in p.relative_to(path).parts))
    if not found:
        raise InputError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES)[:6])}"
                         ", ...); give a folder of notes")
    if len(found) > MAX_FILES:
        raise InputError(f"{path} holds {len(found)} text files, more than {MAX_FILES}; read "
                         "a smaller folder")
    for file in found:
        read_text_file(file)
    return found
