"""Hyper-parameters of the memory layers, validated before any work starts.

Every check raises :class:`InputError` with one line that names the bad value and a fix, so a
conversion with impossible settings fails in milliseconds rather than after cloning a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from engine.errors import InputError
from engine.model.memory_layers.budget import BYTES_PER_PARAMETER, ENTRY_STATS_BYTES, check_fits

FEATURAL_KEY_KINDS = ("product", "flat", "routed")
# The recommended routed read: a third of the slots, in groups of 64, a rank-64 router.
ROUTED_READ_SHARE = 1 / 3
SCORE_WEIGHTINGS = ("softmax", "relu")
# Product-key search enumerates about k ln k candidate pairs per head out of a k x k grid
# built in Python: a top-k far beyond the papers' 16-32 only costs time, never quality.
MAX_PRODUCT_TOPK = 1024
TYPE_WORDS = {"int": "an integer", "float": "a finite number", "bool": "true or false",
              "str": "a string"}


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={value!r} must be a positive integer")
    return value


def _check_field_types(config: Any) -> None:
    """Every field holds its declared type: values come from JSON and the command line,
    where ``value_dim=1.5``, ``decay=abc`` or ``novelty_threshold=NaN`` are easy to write."""
    for item in fields(config):
        value = getattr(config, item.name)
        kind = str(item.type)
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value))
        elif kind == "bool":
            ok = isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise InputError(f"{item.name}={value!r} must be {TYPE_WORDS.get(kind, kind)}")


def _reject_unknown(kind: str, hparams: dict[str, Any], allowed: list[str]) -> None:
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise InputError(
            f"unknown {kind} hyper-parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(allowed))}"
        )


def check_hparams(kind: str, hparams: dict[str, Any]) -> None:
    """Names and types of ``hparams`` for a ``kind`` memory ("featural" or "associative"),
    checked before the teacher (and so the hidden size) is known."""
    cls: Any = FeaturalConfig if kind == "featural" else AssociativeConfig
    _reject_unknown(kind, hparams, [f.name for f in fields(cls) if f.name != "hidden_size"])
    _check_field_types(cls(hidden_size=1, **hparams))


@dataclass(frozen=True)
class FeaturalConfig:
    """A featural memory: learned keys, top-k lookup, weighted sum of values.

    ``keys="product"``: ``heads`` heads, each with a query of ``query_dim`` split in two halves
    scored against ``num_subkeys`` sub-keys each, so ``num_subkeys**2`` slots share one value
    table; softmax-weighted top-``topk`` values per head, summed over heads; optional SiLU gate
    on the output (Memory+), then an output projection to the hidden size.

    ``keys="flat"``: ``slots`` keys live in the hidden space itself (no query projection);
    the weight of slot i is ``activation(x·k_i + b_i)`` (times ``x·u_i`` when ``gated``, the
    SwiGLU form). Top-``topk`` slots by |weight| are read; with ``topk == slots`` this is exactly
    the teacher's MLP, which is what makes exact reproduction testable.

    ``keys="routed"``: flat keys stored in groups of ``group_size`` contiguous slots; a
    rank-``router_rank`` router scores the groups and each token reads its top
    ``read_share`` of them (:mod:`engine.model.memory_layers.routed_keys`, which gives the
    cost formula). ``slots`` may exceed the MLP's neurons (neurons are split); with
    ``read_share=1`` it is the MLP exactly.
    """

    hidden_size: int
    keys: str = "product"
    heads: int = 4
    query_dim: int = 64
    num_subkeys: int = 128
    slots: int = 0  # flat keys only; 0 = the teacher MLP's intermediate size
    topk: int = 16  # flat keys: 0 = every slot (dense, exact)
    value_dim: int = 0  # product keys: 0 = hidden size
    gate: bool = True
    activation: str = "relu"  # flat keys: the weight function (any transformers ACT2FN name)
    gated: bool = False  # flat keys: SwiGLU-style second key set
    sparse: bool = True  # sparse gradients for the value table
    group_size: int = 64  # routed keys: slots per group
    read_share: float = ROUTED_READ_SHARE  # routed keys: share of the groups each token reads
    router_rank: int = 64  # routed keys: rank of the group router
    groups_fixed: int = 0  # routed keys: groups read, kept when slots were added (0: share)
    fact_groups: int = 0  # routed keys: trailing inserted groups, read in addition

    @property
    def num_slots(self) -> int:
        return self.num_subkeys**2 if self.keys == "product" else self.slots

    @property
    def effective_value_dim(self) -> int:
        """The width of the value table: ``value_dim`` resolved (0 and flat keys: hidden)."""
        if self.keys in ("flat", "routed"):
            return self.hidden_size
        return self.value_dim or self.hidden_size

    @property
    def num_groups(self) -> int:
        return self.slots // self.group_size if self.keys == "routed" else 0

    @property
    def groups_read(self) -> int:
        """Routed keys: the groups each token reads, ``read_share`` of them (at least one)."""
        if self.groups_fixed:
            return min(self.num_groups, self.groups_fixed)
        return min(self.num_groups, max(1, round(self.read_share * self.num_groups)))

    @property
    def effective_topk(self) -> int:
        if self.keys == "routed":
            return self.groups_read * self.group_size
        return self.topk or self.num_slots

    def cost_share(self, neurons: int) -> float:
        """Multiply-adds per token over those of an MLP of ``neurons`` (flat and routed)."""
        from engine.model.memory_layers.routed_keys import cost_share

        if self.keys == "routed":
            return cost_share(self.hidden_size, self.slots, self.group_size, self.groups_read,
                              self.router_rank, neurons, self.gated)
        # Flat keys score every key (and up key), then add the top-k values.
        m = 3 if self.gated else 2
        scored = self.slots * self.hidden_size * (m - 1)
        return (scored + self.effective_topk * self.hidden_size) / (neurons * self.hidden_size * m)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hparams(
        cls, hidden_size: int, hparams: dict[str, Any], *, intermediate_size: int = 0,
        activation: str = "relu", gated: bool = False,
    ) -> FeaturalConfig:
        """Build and validate a config; flat-key defaults come from the teacher's MLP."""
        names = [f.name for f in fields(cls) if f.name != "hidden_size"]
        _reject_unknown("featural", hparams, names)
        values: dict[str, Any] = dict(hparams)
        keys = values.get("keys", "product")
        if keys not in FEATURAL_KEY_KINDS:
            raise InputError(f"keys={keys!r} is not a featural key kind; use one of "
                             f"{', '.join(FEATURAL_KEY_KINDS)}")
        if keys in ("flat", "routed"):
            values.setdefault("slots", intermediate_size)
            values.setdefault("topk", 0)
            values.setdefault("activation", activation)
            values.setdefault("gated", gated)
            values.setdefault("gate", False)
        if keys == "routed":
            values.setdefault("sparse", False)  # values are read by matrix products
        config = cls(hidden_size=hidden_size, **values)
        config.validate()
        return config

    def validate(self) -> None:
        _check_field_types(self)
        _positive("hidden_size", self.hidden_size)
        for name in ("gate", "gated", "sparse"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.keys == "product":
            _positive("heads", self.heads)
            _positive("query_dim", self.query_dim)
            _positive("num_subkeys", self.num_subkeys)
            _positive("topk", self.topk)
            if self.query_dim % 2:
                raise InputError(f"query_dim={self.query_dim} is odd; product keys split the "
                                 "query in two halves, give an even query_dim")
            if self.topk > MAX_PRODUCT_TOPK:
                raise InputError(f"topk={self.topk} is more than product keys allow (at most "
                                 f"{MAX_PRODUCT_TOPK}); give a smaller topk (16-32 is usual)")
            if self.topk > self.num_subkeys:
                raise InputError(f"topk={self.topk} exceeds num_subkeys={self.num_subkeys}; "
                                 "product-key search takes the top-k of each half, give "
                                 "topk <= num_subkeys")
            if self.value_dim < 0:
                raise InputError(f"value_dim={self.value_dim} must be positive (0 = hidden size)")
            if self.gated:
                raise InputError("gated=True applies to flat keys only")
        elif self.keys == "routed":
            self._validate_routed()
        else:
            _positive("slots", self.slots)
            if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
                raise InputError(f"topk={self.topk!r} must be a positive integer (0 = all)")
            if self.topk > self.slots:
                raise InputError(f"topk={self.topk} exceeds the {self.slots} slots; give "
                                 f"topk <= {self.slots} (or 0 for all)")
            if self.gate:
                raise InputError("gate=True applies to product keys only")
            from transformers.activations import ACT2FN

            if self.activation not in ACT2FN:
                raise InputError(f"activation={self.activation!r} is unknown; use one of "
                                 "relu, gelu, gelu_new, silu")
        if self.keys not in FEATURAL_KEY_KINDS:
            raise InputError(f"keys={self.keys!r} is not a featural key kind; use one of "
                             f"{', '.join(FEATURAL_KEY_KINDS)}")
        if self.keys == "product":
            check_fits(self.memory_bytes(), f"one featural memory layer ({self.heads} heads, "
                       f"{self.num_subkeys}^2 = {self.num_slots} slots)",
                       "give a smaller num_subkeys, heads, query_dim or value_dim")
        else:
            check_fits(self.memory_bytes(), f"one flat-key memory layer ({self.slots} slots)",
                       "give fewer slots")

    def _validate_routed(self) -> None:
        _positive("slots", self.slots)
        _positive("group_size", self.group_size)
        _positive("router_rank", self.router_rank)
        if self.groups_fixed < 0:
            raise InputError(f"groups_fixed={self.groups_fixed} must not be negative")
        if not 0 <= self.fact_groups < self.num_groups:
            raise InputError(f"fact_groups={self.fact_groups} must be at least 0 and fewer "
                             f"than the {self.num_groups} groups")
        if self.slots % self.group_size:
            raise InputError(f"group_size={self.group_size} does not divide the {self.slots} "
                             "slots; give a group size that divides it (64 for 1,536 slots)")
        if not 0 < self.read_share <= 1:
            raise InputError(f"read_share={self.read_share!r} must be in (0, 1]: the share of "
                             "the groups each token reads (1/3 is the recommended read)")
        if self.topk:
            raise InputError(f"topk={self.topk} does not apply to routed keys; set read_share "
                             "(the share of the groups each token reads)")
        if self.gate:
            raise InputError("gate=True applies to product keys only")
        from transformers.activations import ACT2FN

        if self.activation not in ACT2FN:
            raise InputError(f"activation={self.activation!r} is unknown; use one of "
                             "relu, gelu, gelu_new, silu")

    def memory_bytes(self) -> int:
        """Bytes of the layer's parameters (fp32), counted as ``FeaturalMemory`` builds them:
        refusing a typo such as num_subkeys=1000000 before torch tries to allocate it."""
        hidden, slots, value_dim = self.hidden_size, self.num_slots, self.effective_value_dim
        if self.keys == "product":
            query = self.heads * self.query_dim
            count = hidden * query + query  # query projection
            count += self.heads * self.num_subkeys * self.query_dim  # two sub-key halves
            if self.gate:
                count += hidden * value_dim + value_dim
            count += value_dim * hidden + hidden  # output projection
        else:
            count = slots * (hidden + 1) * (2 if self.gated else 1) + hidden
            if self.keys == "routed":
                count += self.router_rank * (hidden + self.num_groups) + self.num_groups
        return (count + slots * value_dim) * BYTES_PER_PARAMETER  # plus the value table


ASSOCIATIVE_BASES = ("none", "flat")
# The recommended associative recipe (``--memory associative``): the teacher's neurons as the
# layer's fixed entries, read entries attended on top (see ``AssociativeConfig``).
ASSOCIATIVE_RECIPE: dict[str, Any] = {"base": "flat"}
# Read entries (base != "none"): keys are whitened, so an unrelated context lies about
# 2 * key_dim away (squared L2) and the same context at 0; thresholds scale with key_dim.
READ_DEFAULTS: dict[str, Any] = {"heads": 1, "key_dim": 256, "topk": 8, "insert": "never",
                                 "capacity": 65536}
NOVELTY_PER_DIM = 0.0125
RADIUS_PER_DIM = 0.05


@dataclass(frozen=True)
class AssociativeConfig:
    """An associative memory: stored (key, value) entries that grow at run time.

    ``base="none"`` (the proposal's original form): queries, keys and values are projections
    of the hidden state (``key_dim``/``value_dim`` per head); each query attends over its
    ``topk`` nearest stored keys plus its own key. A token whose query is farther than
    ``novelty_threshold`` (squared L2) from every stored key inserts its key and value
    (during training, or always when ``insert="always"``).

    ``base="flat"`` (the recipe): the teacher MLP's neurons are the layer's fixed entries (a
    flat featural memory, exact at conversion), and entries written while reading
    (:mod:`engine.model.reading`) are attended on top: one head, a whitened query, softmax
    over the ``topk`` nearest read entries and a null entry at ``read_radius`` (squared L2),
    ``read_sharpness`` = radius / temperature. A read entry's value (hidden size) is fitted
    so the model predicts what followed the context that wrote it.

    Past ``capacity`` entries the least recently/frequently used are evicted (LRFU with
    ``decay`` per step); ``merge_threshold`` > 0 merges near-duplicate keys that come back
    together in one top-k.
    """

    hidden_size: int
    heads: int = 4
    key_dim: int = 32
    value_dim: int = 64
    topk: int = 16
    capacity: int = 65536
    initial_entries: int = 0  # 0 = filled from the teacher MLP's neurons at conversion
    novelty_threshold: float = 1.0
    merge_threshold: float = 0.0
    decay: float = 0.99
    insert: str = "train"  # "train", "always" or "never"
    base: str = "none"  # "none" or "flat": the teacher's neurons as fixed entries
    read_radius: float = 0.0  # base "flat": the null entry's squared distance (0: default)
    read_sharpness: float = 8.0  # base "flat": radius / softmax temperature

    @property
    def reads(self) -> bool:
        """Whether this is the recipe's form: fixed teacher entries, read entries on top."""
        return self.base != "none"

    @property
    def radius(self) -> float:
        return self.read_radius or RADIUS_PER_DIM * self.key_dim

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hparams(cls, hidden_size: int, hparams: dict[str, Any]) -> AssociativeConfig:
        names = [f.name for f in fields(cls) if f.name != "hidden_size"]
        _reject_unknown("associative", hparams, names)
        values = dict(hparams)
        if values.get("base", "none") != "none":
            for name, default in READ_DEFAULTS.items():
                values.setdefault(name, default)
            if "key_dim" not in hparams:  # whitened: no more directions than the input has
                values["key_dim"] = min(values["key_dim"], hidden_size)
            values.setdefault("value_dim", hidden_size)
            values.setdefault("novelty_threshold", NOVELTY_PER_DIM * values["key_dim"])
        config = cls(hidden_size=hidden_size, **values)
        config.validate()
        return config

    def validate(self) -> None:
        _check_field_types(self)
        for name in ("hidden_size", "heads", "key_dim", "value_dim", "topk", "capacity"):
            _positive(name, getattr(self, name))
        if self.topk > self.capacity:
            raise InputError(f"topk={self.topk} exceeds capacity={self.capacity}; give "
                             "topk <= capacity")
        if not (0 <= self.initial_entries <= self.capacity):
            raise InputError(f"initial_entries={self.initial_entries} must be within "
                             f"0..capacity ({self.capacity})")
        for name in ("novelty_threshold", "merge_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise InputError(f"{name}={value!r} must be a number >= 0")
        if not (0 < self.decay <= 1):
            raise InputError(f"decay={self.decay!r} must be in (0, 1]")
        if self.insert not in ("train", "always", "never"):
            raise InputError(f"insert={self.insert!r} must be train, always or never")
        if self.base not in ASSOCIATIVE_BASES:
            raise InputError(f"base={self.base!r} must be one of {', '.join(ASSOCIATIVE_BASES)}")
        if self.reads:
            self._validate_reads()
        check_fits(self.memory_bytes(), f"one associative memory layer ({self.heads} heads, "
                   f"capacity {self.capacity})",
                   "give a smaller capacity, heads, key_dim or value_dim")

    def _validate_reads(self) -> None:
        if self.heads != 1:
            raise InputError(f"heads={self.heads}: read entries use one head with base="
                             f"{self.base!r}; give heads=1")
        if self.value_dim != self.hidden_size:
            raise InputError(f"value_dim={self.value_dim}: read entries hold a hidden-size "
                             f"value with base={self.base!r}; give value_dim="
                             f"{self.hidden_size}")
        if self.insert != "never":
            raise InputError(f"insert={self.insert!r}: with base={self.base!r} entries are "
                             "written by reading (mindset memory read, eval --learn); give "
                             "insert=never")
        if self.read_radius < 0 or self.read_sharpness <= 0:
            raise InputError(f"read_radius={self.read_radius} and read_sharpness="
                             f"{self.read_sharpness} must be >= 0 and > 0")

    def memory_bytes(self) -> int:
        """Bytes of the layer's projections (fp32) plus a store filled to ``capacity`` (the
        recipe's teacher entries are the MLP's own size on top, known to fit)."""
        query, value = self.heads * self.key_dim, self.heads * self.value_dim
        count = 2 * (self.hidden_size * query + query)  # query and key projections
        if not self.reads:  # read entries carry fitted values: no value projection
            count += self.hidden_size * value + value
        count += value * self.hidden_size + self.hidden_size
        entry = (self.key_dim + self.value_dim) * BYTES_PER_PARAMETER + ENTRY_STATS_BYTES
        return count * BYTES_PER_PARAMETER + self.capacity * entry
