"""Distillation data and settings: files, folders, cache, splits, order, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.distill.config import DistillConfig
from engine.distill.data import BlockOrder, check_text_paths, load_text_data, token_stream
from engine.distill.objective import kd_loss, lr_factor
from engine.errors import InputError
from engine.model.tiny import byte_level_tokenizer


def test_folders_are_read_in_a_stable_order_and_tokenised_once(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bravo " * 50, encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("alpha " * 50, encoding="utf-8")
    (folder / ".hidden").write_bytes(b"\xff\xfe not text")  # hidden files are skipped
    tokenizer = byte_level_tokenizer()
    cache = tmp_path / "cache"
    stream = token_stream([str(folder)], tokenizer, cache)
    text = tokenizer.decode(stream.tolist())
    assert text.index("bravo") < text.index("alpha")  # b.txt sorts before sub/a.txt
    assert tokenizer.eos_token_id in stream.tolist()  # a separator between the files
    cached = list(cache.glob("*.npy"))
    assert len(cached) == 1
    # A second read comes from the cache: the same tokens even with the files' text unchanged.
    assert token_stream([str(folder)], tokenizer, cache).tolist() == stream.tolist()
    # Changed content gets a new cache entry.
    (folder / "b.txt").write_text("charlie " * 50, encoding="utf-8")
    token_stream([str(folder)], tokenizer, cache)
    assert len(list(cache.glob("*.npy"))) == 2


def test_blocks_and_held_out_split(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("x" * 1000, encoding="utf-8")
    data = load_text_data([str(path)], byte_level_tokenizer(), block_size=50,
                          heldout_fraction=0.2, cache_dir=None)
    assert data.train.shape == (16, 50) and data.heldout.shape == (4, 50)


def test_block_order_is_a_function_of_seed_and_step() -> None:
    one, two = BlockOrder(10, 4, seed=3), BlockOrder(10, 4, seed=3)
    steps = [one.indices(s) for s in range(10)]
    assert [two.indices(s) for s in reversed(range(10))] == list(reversed(steps))
    first_epoch = [i for s in steps[:5] for i in s][:10]
    assert sorted(first_epoch) == list(range(10))  # every block once per epoch
    ranks = [BlockOrder(10, 2, seed=3, rank=r, world=2).indices(0) for r in (0, 1)]
    assert ranks[0] + ranks[1] == one.indices(0)  # ranks split the global batch


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: [str(d / "missing.txt")], "no such file or folder"),
        (lambda d: [str(_write(d / "empty.txt", b"  \n"))], "no text in"),
        (lambda d: [str(_mkdir(d / "nothing"))], "empty folder"),
        (lambda d: [str(_write(d / "latin1.txt", "caf\xe9".encode("latin-1")))],
         "latin1.txt is not UTF-8"),
    ],
)
def test_bad_data_gives_a_clear_error_naming_the_file(tmp_path: Path, setup, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=message):
        check_text_paths(setup(tmp_path))


def test_a_non_utf8_file_inside_a_folder_is_named(tmp_path: Path) -> None:
    folder = _mkdir(tmp_path / "corpus")
    _write(folder / "good.txt", b"fine text")
    _write(folder / "bad.bin", b"\x00\x9f\x92\x96")
    with pytest.raises(InputError, match=r"bad\.bin is not UTF-8"):
        token_stream([str(folder)], byte_level_tokenizer(), None)


def test_too_little_text_for_a_block(tmp_path: Path) -> None:
    path = _write(tmp_path / "short.txt", b"short")
    with pytest.raises(InputError, match="needs at least about"):
        load_text_data([str(path)], byte_level_tokenizer(), block_size=64,
                       heldout_fraction=0.1, cache_dir=None)


def test_settings_are_validated() -> None:
    with pytest.raises(InputError, match="unknown memory kind"):
        DistillConfig(memory="magic").validate()
    with pytest.raises(InputError, match="steps must be positive"):
        DistillConfig(steps=0).validate()
    with pytest.raises(InputError, match="unknown distillation settings: bogus"):
        DistillConfig.from_dict({"bogus": 1})


def test_kd_loss_is_zero_for_identical_logits_and_scaled_by_t_squared() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert float(kd_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    p_t = torch.softmax(teacher / 2, -1)
    manual = (p_t * (p_t.log() - torch.log_softmax(student / 2, -1))).sum(-1).mean() * 4
    assert float(kd_loss(student, teacher, 2.0)) == pytest.approx(float(manual), rel=1e-5)


def test_lr_schedule() -> None:
    common = dict(total=100, warmup=10, min_ratio=0.1)
    assert lr_factor(0, schedule="cosine", **common) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **common) == pytest.approx(1.0)
    assert lr_factor(100, schedule="cosine", **common) == pytest.approx(0.1)
    assert lr_factor(55, schedule="linear", **common) == pytest.approx(0.55)
    assert lr_factor(80, schedule="constant", **common) == 1.0


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
