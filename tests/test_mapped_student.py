"""Memory layers mapped copy-on-write from a student's weights file; peak memory reports."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import ModelLoadError
from engine.model.loading import load_model
from engine.model.mapped_weights import (
    ENV_SWITCH,
    is_file_backed,
    map_float32,
    mapped_file,
    memory_tensor_names,
)
from engine.model.student import WEIGHTS_FILE, load_student_model, save_student
from engine.model.surgery import convert, memory_layers
from engine.process_memory import PeakMemory

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                                reason="needs /proc (Linux)")


def token_ids(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    teacher = load_model("tiny-llama")
    student: Any = convert(teacher, [0, 1], "featural", keys="flat")
    memory: Any
    with torch.no_grad():  # non-trivial memories, so a wrong mapping shows in the logits
        for memory in memory_layers(student).values():
            memory.values.normal_(generator=torch.Generator().manual_seed(3))
    return save_student(student, tmp_path_factory.mktemp("mapped") / "s", teacher.tokenizer)


def copy_of(saved: Path, root: Path) -> Path:
    return Path(shutil.copytree(saved, root / "copy"))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=token_ids()).logits
        return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensors(model: Any) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def test_a_mapped_student_gives_the_same_logits_as_one_read_into_ram(saved: Path) -> None:
    mapped = load_student_model(saved)
    read = load_student_model(saved, map_memory=False)
    assert torch.equal(logits(mapped), logits(read))


@linux_only
def test_every_weight_is_mapped_from_the_file(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    model = load_student_model(saved)
    names = memory_tensor_names(model)
    assert names and all(".mlp." in name for name in names)
    state = tensors(model)
    assert all(is_file_backed(state[name], weights) for name in names)
    # The weights kept from the teacher (attention, embeddings, tied head) are mapped too.
    assert all(is_file_backed(tensor, weights) for tensor in state.values() if tensor.numel())
    # The same Parameter objects, still mapped after another float32 conversion.
    memory: Any = memory_layers(model)[0]
    values = memory.values
    model.to(torch.float32)
    assert memory.values is values and is_file_backed(values, weights)


@linux_only
@pytest.mark.parametrize("how", ["argument", "environment", "bfloat16"])
def test_mapping_can_be_switched_off(saved: Path, how: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "environment":
        monkeypatch.setenv(ENV_SWITCH, "0")
    model = load_student_model(saved, map_memory=how != "argument",
                               dtype=torch.bfloat16 if how == "bfloat16" else None)
    state = tensors(model)
    assert not any(is_file_backed(state[name], saved / WEIGHTS_FILE)
                   for name in memory_tensor_names(model))
    if how == "bfloat16":
        assert memory_layers(model)[0].values.dtype == torch.bfloat16


def test_an_in_place_edit_changes_the_outputs_but_never_the_file(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    before = digest(weights)
    model = load_student_model(saved)
    original = logits(model)
    memory: Any = memory_layers(model)[1]
    with torch.no_grad():  # as the Memory pane writes a slot
        for slot in range(memory.values.shape[0]):
            memory.values[slot] = torch.full_like(memory.values[slot], 0.5)
    assert not torch.equal(logits(model), original)
    assert digest(weights) == before
    assert torch.equal(logits(load_student_model(saved)), original)


@linux_only
def test_a_mapped_student_saves_into_its_own_directory(saved: Path, tmp_path: Path) -> None:
    directory = copy_of(saved, tmp_path)
    weights = directory / WEIGHTS_FILE
    model = load_student_model(directory)
    memory: Any = memory_layers(model)[0]
    with torch.no_grad():
        memory.values[3] = torch.full_like(memory.values[3], 2.0)
    edited = logits(model)
    old_inode = weights.stat().st_ino
    other: Any = memory_layers(model)[1]
    before = mapped_file(other.values)
    assert before is not None and before[0] == str(weights)
    save_student(model, directory, load_model("tiny-llama").tokenizer)
    assert weights.stat().st_ino != old_inode  # a new file; the old one lives on in the map
    after = mapped_file(other.values)
    assert after is not None and after[1] == before[1] and after[0] != str(weights)
    assert torch.equal(logits(model), edited)
    again = load_student_model(directory)
    assert torch.equal(logits(again), edited)  # the edit was saved
    assert not list(tmp_path.glob(".copy.*"))  # no staging or trash left behind


# --- damaged files ---------------------------------------------------------------------------


def header_of(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_with_header(path: Path, header: dict[str, Any], data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def one_line_load_error(directory: Path, map_memory: bool = True) -> str:
    with pytest.raises(ModelLoadError) as caught:
        load_student_model(directory, map_memory=map_memory)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert str(directory / WEIGHTS_FILE) in message and "re-save the student" in message
    return message


@pytest.mark.parametrize("map_memory", [True, False], ids=["mapped", "read"])
def test_a_truncated_weights_file_is_refused_in_one_line(saved: Path, tmp_path: Path,
                                                         map_memory: bool) -> None:
    directory = copy_of(saved, tmp_path)
    weights = directory / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "truncated" in one_line_load_error(directory, map_memory)


def test_a_memory_tensor_past_the_end_of_the_file_is_refused_before_mapping(
        saved: Path, tmp_path: Path) -> None:
    directory = copy_of(saved, tmp_path)
    weights = directory / WEIGHTS_FILE
    header, data = header_of(weights)
    name = "model.layers.0.mlp.values"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data), len(data) + end - begin]
    write_with_header(weights, header, data)
    message = one_line_load_error(directory)
    assert "truncated" in message and name in message


@pytest.mark.parametrize(("change", "expected"), [
    ("garbage", "corrupt safetensors header"),
    ("table", "not a tensor table"),
    ("length", "bad offsets"),
    ("shape", "the model expects"),
    ("unexpected", "unexpected tensors"),
])
def test_a_damaged_header_is_refused_in_one_line(saved: Path, tmp_path: Path, change: str,
                                                 expected: str) -> None:
    directory = copy_of(saved, tmp_path)
    weights = directory / WEIGHTS_FILE
    header, data = header_of(weights)
    name = "model.layers.1.mlp.values"
    if change == "garbage":
        raw = bytearray(weights.read_bytes())
        raw[8:24] = b"\xff" * 16
        weights.write_bytes(bytes(raw))
    else:
        if change == "table":
            header = {name: 5}
        elif change == "length":
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin, end - 4]
        elif change == "shape":
            header[name]["shape"] = list(reversed(header[name]["shape"]))
        else:
            header["model.layers.1.mlp.extra"] = dict(header[name])
        write_with_header(weights, header, data)
    assert expected in one_line_load_error(directory)


def test_map_float32_checks_the_file_size_itself(tmp_path: Path) -> None:
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 64)
    with path.open("rb") as handle:
        with pytest.raises(ModelLoadError, match=r"is truncated .*ends at byte 72"):
            map_float32(handle, path, "t", 8, 64, (16,))
        with pytest.raises(ModelLoadError, match="bad offsets"):
            map_float32(handle, path, "t", 0, 60, (16,))
        mapped = map_float32(handle, path, "t", 0, 64, (16,))
    assert mapped is not None and torch.equal(mapped, torch.zeros(16))
    mapped[0] = 1.0  # copy-on-write: the file keeps its zeros
    assert path.read_bytes() == b"\0" * 64


# --- peak memory -----------------------------------------------------------------------------


@linux_only
def test_peak_memory_sees_anonymous_memory_grow() -> None:
    import mmap

    size = 48 << 20
    with PeakMemory() as peak:
        start = peak.peak_anon_mb
        # Fresh private anonymous pages, each written once (calloc'd zeros may never be
        # touched, and a shared mapping counts as shared memory, not anonymous).
        block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        peak.sample()
    assert start is not None and peak.peak_anon_mb is not None and peak.peak_rss_mb is not None
    assert peak.peak_anon_mb >= start + 40
    assert 0 < peak.peak_anon_mb <= peak.peak_rss_mb
    assert peak.hwm_mb is not None and peak.hwm_mb > 0
    assert "anonymous" in peak.summary()
    block.close()


def test_peak_memory_without_proc_falls_back_to_getrusage(tmp_path: Path) -> None:
    with PeakMemory(status=tmp_path / "no-status") as peak:
        pass
    assert peak.peak_anon_mb is None and peak.hwm_mb is None
    if sys.platform != "win32":
        assert peak.peak_rss_mb is not None and peak.peak_rss_mb > 0
        assert peak.summary().startswith("peak memory ") and "anonymous" not in peak.summary()


def test_complete_reports_peak_memory_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    assert run(["complete", "--model", "tiny-llama", "--max-tokens", "3", "--temperature",
                "0", "hi"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "peak memory" not in captured.out
    assert captured.err.startswith("peak memory ") and " MiB" in captured.err
