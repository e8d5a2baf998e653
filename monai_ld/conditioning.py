"""Named attributes -> the conditioning tensors a diffusion UNet takes.

An :class:`AttributeEncoder` holds an ordered list of attribute specs and turns a mapping such as
``{"age": 72, "sex": "F", "diagnosis": "AD"}`` into one flat vector:

- a :class:`ContinuousAttribute` takes one slot, the value rescaled from its declared ``[low, high]`` to ``[0, 1]``;
- a :class:`CategoricalAttribute` takes one slot per class, a one-hot code.

Every valid code lies in ``[0, 1]``; the *null* condition used for classifier-free guidance (CFG) fills the
whole vector with ``NULL_VALUE`` (-1), the same convention as MONAI's ``cfg_fill_value`` default, so MONAI's
own CFG sampling and this package's condition dropout agree on what "unconditional" means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

__all__ = [
    "NULL_VALUE",
    "ConditionError",
    "ContinuousAttribute",
    "CategoricalAttribute",
    "AttributeEncoder",
    "attribute_from_config",
]

NULL_VALUE = -1.0


class ConditionError(ValueError):
    """Bad attribute name or value; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class ContinuousAttribute:
    """A real-valued attribute with a declared range, e.g. ``ContinuousAttribute("age", 40, 95, "years")``."""

    name: str
    low: float
    high: float
    unit: str = ""

    def __post_init__(self):
        if not self.name:
            raise ConditionError("an attribute needs a non-empty name")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ConditionError(f"attribute '{self.name}': range must satisfy low < high, got [{self.low}, {self.high}]")

    @property
    def width(self) -> int:
        return 1

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"a number in [{self.low:g}, {self.high:g}]{unit}"

    def validate(self, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConditionError(f"attribute '{self.name}': {value!r} is not a number; accepted: {self.describe()}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise ConditionError(f"attribute '{self.name}': {value!r} is not a number; accepted: {self.describe()}")
        v = float(value)
        if not math.isfinite(v) or v < self.low or v > self.high:
            raise ConditionError(f"attribute '{self.name}': {value!r} is out of range; accepted: {self.describe()}")
        return v

    def encode(self, value: Any) -> list[float]:
        return [(self.validate(value) - self.low) / (self.high - self.low)]

    def decode(self, code: Sequence[float]) -> float:
        return self.low + float(code[0]) * (self.high - self.low)

    def to_config(self) -> dict:
        return {"type": "continuous", "name": self.name, "low": self.low, "high": self.high, "unit": self.unit}


@dataclass(frozen=True)
class CategoricalAttribute:
    """A categorical attribute with declared classes, e.g. ``CategoricalAttribute("diagnosis", ("CN", "MCI", "AD"))``.

    Values may be given as the class name (case-insensitive) or as the integer class index.
    """

    name: str
    classes: tuple[str, ...]

    def __post_init__(self):
        if not self.name:
            raise ConditionError("an attribute needs a non-empty name")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) < 2 or len({c.lower() for c in self.classes}) != len(self.classes):
            raise ConditionError(f"attribute '{self.name}': needs at least two distinct classes, got {self.classes}")

    @property
    def width(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return "one of " + ", ".join(self.classes) + f" (or index 0..{len(self.classes) - 1})"

    def validate(self, value: Any) -> int:
        if isinstance(value, str):
            lowered = [c.lower() for c in self.classes]
            key = value.strip().lower()
            if key in lowered:
                return lowered.index(key)
            if key.lstrip("-").isdigit():
                value = int(key)
            else:
                raise ConditionError(f"attribute '{self.name}': unknown class {value!r}; accepted: {self.describe()}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.classes):
            raise ConditionError(f"attribute '{self.name}': invalid value {value!r}; accepted: {self.describe()}")
        return value

    def encode(self, value: Any) -> list[float]:
        code = [0.0] * len(self.classes)
        code[self.validate(value)] = 1.0
        return code

    def decode(self, code: Sequence[float]) -> str:
        idx = max(range(len(self.classes)), key=lambda i: float(code[i]))
        return self.classes[idx]

    def to_config(self) -> dict:
        return {"type": "categorical", "name": self.name, "classes": list(self.classes)}


Attribute = Union[ContinuousAttribute, CategoricalAttribute]


def attribute_from_config(config: Mapping[str, Any]) -> Attribute:
    """Build an attribute from ``{"type": "continuous", "name", "low", "high"[, "unit"]}`` or
    ``{"type": "categorical", "name", "classes"}``."""
    kind = config.get("type")
    if kind == "continuous":
        return ContinuousAttribute(str(config["name"]), float(config["low"]), float(config["high"]), str(config.get("unit", "")))
    if kind == "categorical":
        return CategoricalAttribute(str(config["name"]), tuple(config["classes"]))
    raise ConditionError(f"attribute config {dict(config)!r}: 'type' must be 'continuous' or 'categorical'")


class AttributeEncoder:
    """Ordered attribute specs and the code they make.

    Args:
        attributes: attribute specs (objects or config dicts); order fixes the layout of the code vector.

    Example::

        enc = AttributeEncoder([ContinuousAttribute("age", 40, 95, "years"), CategoricalAttribute("sex", ("F", "M"))])
        enc.encode({"age": 70, "sex": "M"})        # tensor([0.5455, 0., 1.])
        enc.context([{"age": 70, "sex": "M"}])     # (1, 1, 3), for cross-attention
    """

    def __init__(self, attributes: Iterable[Attribute | Mapping[str, Any]]):
        attrs = [a if isinstance(a, (ContinuousAttribute, CategoricalAttribute)) else attribute_from_config(a) for a in attributes]
        if not attrs:
            raise ConditionError("an AttributeEncoder needs at least one attribute")
        names = [a.name for a in attrs]
        if len(set(names)) != len(names):
            raise ConditionError(f"duplicate attribute names in {names}")
        self.attributes: tuple[Attribute, ...] = tuple(attrs)

    # -- layout ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    @property
    def dim(self) -> int:
        """Length of the code vector (the UNet's ``cross_attention_dim`` in cross-attention mode)."""
        return sum(a.width for a in self.attributes)

    def __getitem__(self, name: str) -> Attribute:
        for a in self.attributes:
            if a.name == name:
                return a
        raise ConditionError(f"unknown attribute {name!r}; accepted: {', '.join(self.names)}")

    def describe(self) -> str:
        return "; ".join(f"{a.name}: {a.describe()}" for a in self.attributes)

    def to_config(self) -> list[dict]:
        return [a.to_config() for a in self.attributes]

    @classmethod
    def from_config(cls, config: Sequence[Mapping[str, Any]]) -> AttributeEncoder:
        return cls(config)

    # -- values ---------------------------------------------------------------------------------------------------
    def validate(self, values: Mapping[str, Any], partial: bool = False) -> dict[str, Any]:
        """Check names and values; return them normalised (floats for continuous, class names for categorical).

        Args:
            values: attribute name -> value.
            partial: allow a subset of the attributes (e.g. a user changing only ``age``).

        Raises:
            ConditionError: one message naming every problem and what is accepted.
        """
        if not isinstance(values, Mapping):
            raise ConditionError(f"attributes must be a mapping of name -> value, got {type(values).__name__}")
        problems = []
        unknown = [k for k in values if k not in self.names]
        if unknown:
            problems.append(f"unknown attribute(s) {', '.join(map(repr, unknown))}")
        missing = [n for n in self.names if n not in values]
        if missing and not partial:
            problems.append(f"missing attribute(s) {', '.join(map(repr, missing))}")
        out: dict[str, Any] = {}
        for a in self.attributes:
            if a.name in values:
                try:
                    v = a.validate(values[a.name])
                    out[a.name] = a.classes[v] if isinstance(a, CategoricalAttribute) else v
                except ConditionError as e:
                    problems.append(str(e))
        if problems:
            raise ConditionError("; ".join(problems) + f". Accepted attributes: {self.describe()}")
        return out

    def encode(self, values: Mapping[str, Any]) -> torch.Tensor:
        """Code vector of shape ``(dim,)`` for one complete set of attribute values."""
        clean = self.validate(values)
        code: list[float] = []
        for a in self.attributes:
            code.extend(a.encode(clean[a.name]))
        return torch.tensor(code, dtype=torch.float32)

    def encode_batch(self, rows: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        """``(B, dim)`` codes; a ``None`` row gives the null code."""
        if isinstance(rows, Mapping):
            rows = [rows]
        return torch.stack([self.null_vector() if r is None else self.encode(r) for r in rows])

    def decode(self, code: torch.Tensor) -> dict[str, Any]:
        """Inverse of :meth:`encode` for a ``(dim,)`` code (argmax for categorical slots)."""
        values, i = {}, 0
        flat = [float(x) for x in torch.as_tensor(code).reshape(-1)]
        for a in self.attributes:
            values[a.name] = a.decode(flat[i : i + a.width])
            i += a.width
        return values

    def null_vector(self) -> torch.Tensor:
        return torch.full((self.dim,), NULL_VALUE, dtype=torch.float32)

    def is_null(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: which rows of a ``(B, dim)`` or ``(B, 1, dim)`` code are the null condition."""
        return (codes.reshape(codes.shape[0], -1) == NULL_VALUE).all(dim=1)

    # -- the tensors networks take ------------------------------------------------------------------------------
    def context(self, rows: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None, batch_size: int = 1) -> torch.Tensor:
        """Cross-attention context ``(B, 1, dim)``; ``rows=None`` gives ``batch_size`` null rows."""
        if rows is None:
            return self.null_vector().expand(batch_size, -1).unsqueeze(1).clone()
        return self.encode_batch(rows if not isinstance(rows, Mapping) else [rows]).unsqueeze(1)

    @staticmethod
    def to_spatial(codes: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Broadcast ``(B, dim)`` or ``(B, 1, dim)`` codes to ``(B, dim, *spatial_shape)`` for ``mode="concat"``."""
        flat = codes.reshape(codes.shape[0], -1)
        view = flat.reshape(*flat.shape, *([1] * len(spatial_shape)))
        return view.expand(*flat.shape, *spatial_shape).contiguous()

    @staticmethod
    def drop(codes: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Condition dropout for CFG training: each row replaced by the null code with probability ``p``."""
        if not 0.0 <= p <= 1.0:
            raise ConditionError(f"condition dropout probability must be in [0, 1], got {p}")
        if p == 0.0:
            return codes
        keep = torch.rand(codes.shape[0], generator=generator, device="cpu" if generator is not None else codes.device)
        mask = (keep.to(codes.device) < p).reshape(-1, *([1] * (codes.ndim - 1)))
        return torch.where(mask, torch.full_like(codes, NULL_VALUE), codes)

    def __repr__(self) -> str:
        return f"AttributeEncoder({self.describe()})"
