"""``EditSettings``: how a counterfactual is made, one frozen dataclass under MONAI / diffusers names.

Every place that takes edit settings goes through it: the pipeline's plan (:meth:`CounterfactualPipeline.resolve`),
the CLI flags (:meth:`EditSettings.add_arguments`), the MONAI Label request keys, the bundles' ``settings``
component and the settings written to ``record.json``. It validates once, in ``__post_init__``.

Older names are read through :attr:`EditSettings.ALIASES` only (checkpoints trained before carry a ``guidance`` key
in ``meta["defaults"]``; old configs and habits say ``steps``); everything written uses the field names.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from monai.utils import StrEnum

__all__ = ["Abduction", "Composition", "EditSettings", "MAX_SAMPLES", "OUTPUT_SPACES", "optional_float"]


class Abduction(StrEnum):
    """How the source image's noise is recovered."""

    INVERSION = "inversion"  # deterministic DDIM inversion under the source condition
    NOISING = "noising"  # stochastic forward noising (SDEdit-like)


class Composition(StrEnum):
    """How the edited decode is put back together with the input."""

    NONE = "none"  # the decoded counterfactual D(z'_0)
    RESIDUAL = "residual"  # x + (D(z'_0) - D(z_0)): keep what the autoencoder cannot reconstruct
    PAIRED = "paired"  # x + (D(z'_0) - D(z^s_0)): z^s_0 regenerated from the same z_t under the source condition


OUTPUT_SPACES = ("native", "model")
MAX_SAMPLES = 64


def optional_float(value: Any) -> float | None:
    """A number where ``None`` / ``"none"`` / ``""`` means off (guidance_scale: no CFG; mask_threshold: no mask)."""
    return None if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")) else float(value)


def _setting(default: Any, kind: str, help: str, choices: tuple[str, ...] = (), lo: float | None = None,
             hi: float | None = None, open_range: bool = False) -> Any:
    # kind: how a given value is parsed (float | optional_float | int | choice); lo/hi: the accepted range
    return field(default=default, metadata={"kind": kind, "help": help, "choices": choices, "range": (lo, hi),
                                            "open": open_range})


_PARSE = {"float": float, "optional_float": optional_float, "int": int, "choice": lambda v: str(v).strip().lower()}


@dataclass(frozen=True)
class EditSettings:
    """The edit settings (defaults: the package's; a model's ``meta["defaults"]`` and a request override them)."""

    drift: float = _setting(0.0, "float", "Latent Drifting δ added after every denoising step (typical -0.2..0.2)",
                            lo=-1.0, hi=1.0)
    strength: float = _setting(0.6, "float", "fraction of the diffusion steps inverted and regenerated, 0..1",
                               lo=0.0, hi=1.0)
    guidance_scale: float | None = _setting(3.0, "optional_float", "classifier-free guidance scale (1 = the target "
                                            "condition alone; 'none' = no guidance)", lo=0.0, hi=50.0)
    num_inference_steps: int = _setting(50, "int", "denoising steps of the scheduler (DDIM)", lo=1)
    seed: int = _setting(0, "int", "random seed (every draw comes from generators seeded with it)")
    composition: str = _setting("none", "choice", "residual: input + (D(z') - D(z)); paired: input + (D(z') - "
                                "D(z_source)), the same noise regenerated under the source attributes (identity edit "
                                "= input)", choices=tuple(c.value for c in Composition))
    abduction: str = _setting("inversion", "choice", "inversion: deterministic DDIM inversion (default); noising: "
                              "stochastic (default with samples > 1)", choices=tuple(a.value for a in Abduction))
    mask_threshold: float | None = _setting(None, "optional_float", "localise the edit (DiffEdit mask where the "
                                            "condition changes the noise prediction; in (0, 1), higher = smaller "
                                            "region; 'none' = no mask)", lo=0.0, hi=1.0, open_range=True)
    output_space: str = _setting("native", "choice", "native: input + the model's change on the input's own grid, "
                                 "units and dtype, every voxel outside the edit region the input's own; model: the "
                                 "whole model output resampled to the input's geometry (model intensity scale)",
                                 choices=OUTPUT_SPACES)
    samples: int = _setting(1, "int", "N counterfactuals from seeds seed..seed+N-1 in one batch: the mean is the "
                            "counterfactual, the per-voxel standard deviation the uncertainty", lo=1, hi=MAX_SAMPLES)

    # old name -> field: the one place older checkpoints, configs, requests and CLI habits are translated
    ALIASES: ClassVar[dict[str, str]] = {"guidance": "guidance_scale", "steps": "num_inference_steps"}

    def __post_init__(self) -> None:
        for f in fields(self):
            meta, value = f.metadata, getattr(self, f.name)
            try:
                value = _PARSE[meta["kind"]](value)
            except (TypeError, ValueError):
                raise ValueError(f"{f.name}: expected {_expected(f)}, got {value!r}") from None
            lo, hi = meta["range"]
            bad_choice = meta["choices"] and value not in meta["choices"]
            outside = value is not None and ((lo is not None and (value <= lo if meta["open"] else value < lo)) or
                                             (hi is not None and (value >= hi if meta["open"] else value > hi)))
            if bad_choice or outside:
                raise ValueError(f"{f.name} must be {_expected(f)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        if self.samples > 1 and self.abduction == Abduction.INVERSION:
            raise ValueError("samples > 1 need a stochastic abduction: DDIM inversion is deterministic, so every sample "
                             "would be the same; use abduction 'noising' (the default when samples > 1)")

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def canonical(cls, key: str) -> str | None:
        """The field a (possibly old) key names, else ``None``."""
        key = cls.ALIASES.get(key, key)
        return key if key in cls.keys() else None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None = None, base: EditSettings | Mapping[str, Any] | None = None,
                     **given: Any) -> EditSettings:
        """``base`` (settings, a mapping such as a checkpoint's ``meta["defaults"]``, or the package defaults) with
        the entries of ``mapping`` and ``given`` replaced; a ``None`` value means "not given" (``"none"`` turns a
        setting off). Raises ValueError naming an unknown key or a bad value and what is accepted.

        With ``samples`` > 1 and DDIM inversion coming from ``base`` the abduction becomes ``"noising"`` (each sample
        noises the input with its own seed); asked for explicitly, that is an error.
        """
        values: dict[str, Any] = {}
        unknown = []
        for key, value in {**dict(mapping or {}), **given}.items():
            name = cls.canonical(key)
            if name is None:
                unknown.append(key)
            elif value is not None:
                if name in values and values[name] != value:
                    raise ValueError(f"{name} given twice (also as {key!r}): {values[name]!r} and {value!r}")
                values[name] = value
        if unknown:
            old = ", ".join(f"{k} -> {v}" for k, v in cls.ALIASES.items())
            raise ValueError(f"unknown setting(s) {unknown}; accepted: {', '.join(cls.keys())} (old names: {old})")
        start = base if isinstance(base, EditSettings) else cls.from_mapping(base) if base else cls()
        samples = values.get("samples", start.samples)
        if "abduction" not in values and start.abduction == Abduction.INVERSION and _as_int(samples) > 1:
            values["abduction"] = Abduction.NOISING.value
        return dataclasses.replace(start, **values)

    @classmethod
    def given(cls, mapping: Mapping[str, Any] | None) -> dict[str, Any]:
        """The settings ``mapping`` gives (``None`` values dropped), validated, under the field names: what a
        checkpoint's ``meta["defaults"]`` or a report stores."""
        cls.from_mapping(mapping)  # an unknown key or a bad value fails here
        return {cls.canonical(k): v for k, v in dict(mapping or {}).items() if v is not None}

    def update(self, mapping: Mapping[str, Any] | None = None, **given: Any) -> EditSettings:
        """These settings with the given ones replaced (see :meth:`from_mapping`)."""
        return self.from_mapping(mapping, self, **given)

    def asdict(self) -> dict[str, Any]:
        """Field name -> value: what plans hold and ``record.json`` writes."""
        return dataclasses.asdict(self)

    # -- command line -----------------------------------------------------------------------------------------------
    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"guidance_scale": ("--guidance",),
                                                          "num_inference_steps": ("--steps",)}

    @classmethod
    def add_arguments(cls, group: Any, only: tuple[str, ...] | None = None) -> None:
        """One ``--flag`` per field (``--guidance-scale``, also ``--guidance``; ``--num-inference-steps``, also
        ``--steps``; ``only``: these fields), default ``None`` = the model's; read them back with :meth:`from_args`."""
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            meta = f.metadata
            flags = (f"--{f.name.replace('_', '-')}", *cls.FLAG_ALIASES.get(f.name, ()))
            kw: dict[str, Any] = {"dest": f.name, "default": None, "help": meta["help"]}
            if meta["choices"]:
                kw["choices"] = meta["choices"]
            else:
                kw["type"] = {"float": float, "int": int, "optional_float": _cli_optional_float}[meta["kind"]]
                kw["metavar"] = {"float": "X", "int": "N", "optional_float": "X|none"}[meta["kind"]]
            group.add_argument(*flags, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The settings given on the command line (field -> value; the ones left out are absent)."""
        return {k: getattr(args, k) for k in cls.keys() if getattr(args, k, None) is not None}


def _expected(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["choices"]:
        return f"one of {', '.join(meta['choices'])}"
    lo, hi = meta["range"]
    kind = "an integer" if meta["kind"] == "int" else "a number"
    span = "" if lo is None else f" in {'(' if meta['open'] else '['}{lo}, {hi}{')' if meta['open'] else ']'}" \
        if hi is not None else f" >= {lo}"
    return kind + span + (" or 'none'" if meta["kind"] == "optional_float" else "")


def _as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1  # __post_init__ reports the bad value


def _cli_optional_float(value: str) -> float | str:
    if value.strip().lower() == "none":
        return "none"  # explicit: off (None would mean "the model's default")
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {value!r}") from None
