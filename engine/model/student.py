"""Save and load a student (a model with memory layers) as one directory.

Layout::

    config.json            the Hugging Face config of the cloned teacher architecture
    mindset_student.json   teacher, family, replaced layers, kind, hyper-parameters, init
    model.safetensors      every weight (teacher copies and memory layers)
    memory/                tables of associative memory layers (entries that grow at run time)
    tokenizer files        when a tokenizer was given

Saving writes into a temporary directory beside the target and renames it into place, so an
interrupted save never leaves half a student where a good one was.

Loading reads JSON, safetensors (with plain file reads, see below; the memory layers are
mapped from the file instead, see :mod:`engine.model.mapped_weights`) and the memory store's
SQLite tables only; nothing in a student directory is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.atomic import swap_directory
from engine.errors import InputError, MindsetError, ModelLoadError, flat_text
from engine.model.anatomy import decoder_layers, mlp_size, mlp_size_field
from engine.model.architecture.record import apply_architecture, record_of_config, stamp_record
from engine.model.hf_remote import write_remote_code
from engine.model.mapped_weights import map_float32, mapped_tensor_names, mapping_enabled
from engine.model.memory_layers.budget import BYTES_PER_PARAMETER, check_fits
from engine.model.memory_layers.routed_keys import current_name, legacy_to_current
from engine.model.model_files import (
    FAMILIES,
    STUDENT_FILE,
    is_student_dir,
    model_parameters,
    read_config,
)
from engine.model.model_files import STUDENT_WEIGHTS as WEIGHTS_FILE
from engine.model.surgery import (
    StudentSpec,
    attach_memory_layers,
    memory_layers,
    student_spec,
    unwrap,
)

MEMORY_DIR = "memory"
__all__ = ["MEMORY_DIR", "STUDENT_FILE", "WEIGHTS_FILE", "is_student_dir", "load_student_model",
           "read_spec", "save_student"]


def save_student(model: Any, directory: Path | str, tokenizer: Any = None) -> Path:
    """Write ``model`` (a student from ``convert``) and its tokenizer to ``directory``."""
    from safetensors.torch import save_model

    module = unwrap(model)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    spec = student_spec(module)
    if spec is None:
        raise InputError("this model is not a student; convert a teacher first")
    final = Path(directory).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} is a file; give a directory to save the student in")
    if final.exists() and any(final.iterdir()) and not is_student_dir(final):
        raise InputError(f"{final} is not empty and holds no student; give a new or empty "
                         "directory so nothing is overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        stamp_record(module)  # heads, widths, gates, feedback, channels: what config can't say
        config: Any = module.config
        config.save_pretrained(str(staging))
        write_remote_code(staging)  # AutoModelForCausalLM.from_pretrained(trust_remote_code)
        generation = getattr(module, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(staging))
        save_model(module, str(staging / WEIGHTS_FILE))
        for layer, memory in memory_layers(module).items():
            save_tables = getattr(memory, "save_tables", None)
            if save_tables is not None:
                save_tables(staging / MEMORY_DIR, f"layer{layer}")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _claim_journal(spec, final)
        (staging / STUDENT_FILE).write_text(json.dumps(spec.as_dict(), indent=2),
                                            encoding="utf-8")
        if final.exists():
            from engine.model.edit_journal import EditJournal

            EditJournal(final).copy_to(staging)  # the edit history stays with the student
        swap_directory(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


# The types a spec's fields must have; a hand-edited file could hold anything.
SPEC_TYPES: dict[str, type | tuple[type, ...]] = {
    "teacher": str, "family": str, "layers": list, "kind": str, "hparams": dict, "init": str,
    "notes": dict, "layer_hparams": dict,
}


def read_spec(directory: Path) -> StudentSpec:
    path = directory / STUDENT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = flat_text(exc)
        raise ModelLoadError(f"{path} is unreadable ({reason}); re-save the student") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object; re-save the student")
    for name, kind in SPEC_TYPES.items():
        if name in data and not isinstance(data[name], kind):
            raise ModelLoadError(f"{path}: {name}={data[name]!r} has the wrong type; re-save "
                                 "the student")
    if data.get("family") not in FAMILIES:
        raise ModelLoadError(f"{path}: family={data.get('family')!r} is not one of "
                             f"{', '.join(FAMILIES)}; re-save the student")
    try:
        return StudentSpec.from_dict(data)
    except TypeError as exc:  # a required field is missing
        raise ModelLoadError(f"{path} is incomplete ({exc}); re-save the student") from exc


def load_student_model(directory: Path | str, *, dtype: Any = None,
                       map_memory: bool = True) -> Any:
    """The student model alone (no tokenizer), in eval mode.

    With ``map_memory`` (and ``dtype`` None or float32, and ``MINDSET_MAP_MEMORY`` not 0), the
    memory layers' float32 tensors are mapped copy-on-write from ``model.safetensors`` rather
    than read into RAM (see :mod:`engine.model.mapped_weights`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory).expanduser().resolve()
    if not is_student_dir(directory):
        raise ModelLoadError(f"{directory} is not a student directory (no {STUDENT_FILE})")
    spec = read_spec(directory)
    # Sizes checked before transformers builds anything from them.
    parameters = model_parameters(read_config(directory))
    check_fits(parameters * BYTES_PER_PARAMETER,
               f"the student in {directory} ({parameters:,} parameters)",
               "check its config.json", ModelLoadError)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"{weights} is missing; re-save the student")
    from transformers.initialization import no_init_weights

    # Every weight is read from the file next, so skip initialising (and touching) memory.
    with no_init_weights():
        try:
            config = AutoConfig.from_pretrained(str(directory))
            model = build_skeleton(config, spec, AutoModelForCausalLM)
        except Exception as exc:
            reason = flat_text(exc)[:300]
            raise ModelLoadError(f"{directory}/config.json cannot be used ({reason})") from exc
        try:  # heads, MLP widths, gates, feedback: the shape surgery left (if any)
            apply_architecture(model, record_of_config(config))
        except InputError as exc:
            raise ModelLoadError(f"{directory}: {exc}") from exc
        try:
            attach_memory_layers(model, spec)
        except InputError as exc:
            raise ModelLoadError(f"{directory / STUDENT_FILE} does not fit the model: "
                                 f"{exc}") from exc
    model.tie_weights()  # skipped with the initialisation; tied tensors are saved once
    mapped = mapped_tensor_names(model) if mapping_enabled(map_memory, dtype) else set()
    try:
        read_weights_into(model, weights, mapped=mapped)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{weights} does not load ({exc}); re-save the student") from exc
    except OSError as exc:
        raise ModelLoadError(f"{weights} does not load ({exc}); re-save the student") from exc
    for layer, memory in memory_layers(model).items():
        load_tables = getattr(memory, "load_tables", None)
        if load_tables is not None:
            try:
                load_tables(directory / MEMORY_DIR, f"layer{layer}")
            except MindsetError as exc:
                raise ModelLoadError(f"the memory of layer {layer} in {directory / MEMORY_DIR} "
                                     f"does not load ({exc}); re-save the student") from exc
            except (OSError, ValueError, sqlite3.Error) as exc:
                raise ModelLoadError(f"the memory of layer {layer} in {directory / MEMORY_DIR} "
                                     f"does not load ({type(exc).__name__}: "
                                     f"{' '.join(str(exc).split())}); re-save the student"
                                     ) from exc
    model.to(dtype or torch.float32)  # a mapped float32 tensor is kept as it is, not copied
    _replay_edits(model, directory, spec)
    model.eval()
    return model


def _claim_journal(spec: StudentSpec, directory: Path) -> None:
    """A model saved over a student directory whose edit journal it never read (another or
    a retrained student: its spec records no applied edit) takes the journal as history
    only: none of those edits is replayed onto its weights."""
    from engine.model.edit_journal import APPLIED_NOTE, EditJournal

    journal = EditJournal(directory)
    if APPLIED_NOTE not in spec.notes and journal.exists():
        spec.notes[APPLIED_NOTE] = journal.last_id()


def _replay_edits(model: Any, directory: Path, spec: StudentSpec) -> None:
    """Apply journaled edits that the saved weights do not hold yet (a crash came between
    an edit and its save; see :mod:`engine.model.edit_journal`)."""
    from engine.model.edit_journal import APPLIED_NOTE, EditJournal, replay

    journal = EditJournal(directory)
    if not journal.exists():
        return
    applied = int(spec.notes.get(APPLIED_NOTE, 0))
    try:
        last = replay(model, journal, applied)
    except (MindsetError, sqlite3.Error, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"the edit journal {journal.path} does not replay "
                             f"({flat_text(exc)[:200]}); move it away to load the student "
                             "as last saved") from exc
    attached = student_spec(model)
    if attached is not None:
        attached.notes[APPLIED_NOTE] = last


def build_skeleton(config: Any, spec: StudentSpec, auto_class: Any) -> Any:
    """The teacher architecture without allocating the MLPs that memory layers replace.

    Built with one-neuron MLPs, then full MLPs are put back only in the layers the student
    kept: a student with every layer replaced never holds the teacher's MLP weights, so its
    peak memory stays below the teacher's.
    """
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "auto_map"):  # the entry for plain transformers (hf_remote), not ours
        del config.auto_map
    width_field = mlp_size_field(spec.family)
    width = getattr(config, width_field)
    setattr(config, width_field, 1)
    model = auto_class.from_config(config)
    setattr(config, width_field, width)  # the model's own config object: the true width again
    config = model.config
    replaced = set(spec.layers)
    for index, block in enumerate(decoder_layers(model)):
        if index in replaced:
            continue
        mlp_class = type(block.mlp)
        if spec.family == "gpt2":
            block.mlp = mlp_class(mlp_size(config), config)
        else:
            block.mlp = mlp_class(config)
    return model


def load_tokenizer(directory: Path, spec: StudentSpec) -> Any:
    """The tokenizer saved beside the student (the byte-level one for a tiny teacher)."""
    from transformers import AutoTokenizer

    from engine.model.tiny import byte_level_tokenizer

    has_tokenizer = any((directory / name).is_file()
                        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_tokenizer:
        try:
            return AutoTokenizer.from_pretrained(str(directory))
        except Exception as exc:
            raise ModelLoadError(f"{directory} has an unusable tokenizer ({exc}); re-save the "
                                 "student with its teacher's tokenizer") from exc
    if spec.teacher.startswith("tiny-"):
        return byte_level_tokenizer()
    raise ModelLoadError(f"{directory} has no tokenizer; re-save the student with its "
                         "teacher's tokenizer")


# --- reading weights -------------------------------------------------------------------------
# ``safetensors`` maps the file into memory, so every page it reads stays in the process's
# resident set until the file is closed: loading a 500 MB student that way briefly costs the
# weights twice over. Reading each tensor with plain file I/O into the (not yet touched)
# memory of the model's own parameters costs them once, which keeps a student's peak memory
# below its teacher's. The memory layers' tensors (``mapped``) are mapped copy-on-write
# instead: file-backed pages the OS may drop and share (see engine.model.mapped_weights).

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _header(handle: object, path: Path) -> tuple[dict[str, dict[str, object]], int]:
    raw = handle.read(8)  # type: ignore[attr-defined]
    if len(raw) != 8:
        raise ModelLoadError(f"{path} is truncated (no safetensors header)")
    (size,) = struct.unpack("<Q", raw)
    if size > 100_000_000:
        raise ModelLoadError(f"{path} is not a safetensors file (header size {size})")
    try:
        header = json.loads(handle.read(size))  # type: ignore[attr-defined]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} has a corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ModelLoadError(f"{path} has a corrupt safetensors header (not a tensor table)")
    header.pop("__metadata__", None)
    return header, 8 + size


@torch.no_grad()
def read_weights_into(model: nn.Module, path: Path, *, mapped: Collection[str] = ()) -> None:
    """Fill every parameter and persistent buffer of ``model`` from ``path`` (strict).

    Tensors tied to another one (same storage, such as a tied LM head) may be absent from the
    file; anything else missing, unexpected or of the wrong shape is an error. Tensors named
    in ``mapped`` that are float32 both in the file and in the model are mapped from the file
    (copy-on-write) rather than read; the Parameter objects stay the same.
    """
    state = model.state_dict(keep_vars=True)
    filled: set[int] = set()
    with path.open("rb") as handle:
        header, data_start = _header(handle, path)
        upgraded = {name: current_name(name) for name in header if name not in state}
        renamed = {name: new for name, new in upgraded.items() if new is not None and new in state}
        unexpected = sorted(set(header) - set(state) - set(renamed))
        if unexpected:
            raise ModelLoadError(f"{path} holds unexpected tensors: {', '.join(unexpected[:5])}")
        for name, meta in header.items():
            try:
                shape: tuple[int, ...] = tuple(meta["shape"])  # type: ignore[arg-type]
                dtype = DTYPES.get(str(meta["dtype"]))
                offsets: list[int] = list(meta["data_offsets"])  # type: ignore[call-overload]
                begin, end = (int(offset) for offset in offsets)
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelLoadError(f"{path} has a malformed entry for tensor {name} "
                                     f"({type(exc).__name__})") from exc
            target = state[renamed.get(name, name)].data
            expected = tuple(target.shape)
            if name in renamed:  # saved slot-major: [G, parts·s, hidden]
                expected = (expected[0], expected[2], expected[1])
            if dtype is None or shape != expected:
                raise ModelLoadError(f"{path}: tensor {name} is {meta['dtype']} {list(shape)}, "
                                     f"the model expects {list(expected)}")
            if not 0 <= begin <= end:
                raise ModelLoadError(f"{path} has bad offsets for tensor {name}")
            if name in mapped and meta["dtype"] == "F32" and target.dtype == torch.float32:
                view = map_float32(handle, path, name, data_start + begin, end - begin, shape)
                if view is not None:
                    state[name].data = view
                    filled.add(view.untyped_storage().data_ptr())
                    continue
            destination = target if (dtype == target.dtype and target.is_contiguous()
                                     and name not in renamed) \
                else torch.empty(shape, dtype=dtype)
            if destination.numel():
                buffer: Any = destination.view(-1).view(torch.uint8).numpy()
                handle.seek(data_start + begin)
                if handle.readinto(memoryview(buffer)) != end - begin:
                    raise ModelLoadError(f"{path} is truncated (tensor {name})")
            if name in renamed:
                destination = legacy_to_current(destination)
            if destination is not target:
                target.copy_(destination)
            filled.add(target.untyped_storage().data_ptr())
    missing = [name for name, tensor in state.items()
               if tensor.numel() and tensor.untyped_storage().data_ptr() not in filled]
    if missing:
        raise ModelLoadError(f"{path} lacks tensors: {', '.join(missing[:5])}")
