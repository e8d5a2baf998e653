"""Request parameters of a counterfactual infer call -> a validated request (independent of MONAI Label).

A request's ``params`` (the JSON form field of ``POST /infer/<model>``) may name the target the API way::

    {"target": {"diagnosis": "AD"}, "source": {"age": 71, "sex": "F", "diagnosis": "CN"},
     "drift": 0.05, "strength": 0.6, "guidance_scale": 3.0, "seed": 0, "num_inference_steps": 20,
     "result": "counterfactual"}

or the flat way 3D Slicer's MONAI Label "Options" table sends the model's config (one cell per key; a list value is
a drop-down whose chosen item comes first; ``""`` / ``"(keep)"`` / ``"(unknown)"`` mean "not given")::

    {"target_diagnosis": ["AD", "(keep)", "CN", "MCI"], "target_age": "", "source_age": "71", ...}

Entries of ``target`` / ``source`` override flat ones. Settings left out take the model's (bundle's) defaults.
``result`` picks the volume the response carries: ``"counterfactual"`` (default), ``"difference"``
(counterfactual − input; the input's units in the native output space) or ``"uncertainty"`` (with ``samples`` > 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from monai_ld.settings import EditSettings

__all__ = ["RequestError", "CounterfactualRequest", "parse_params", "RESULT_KINDS", "SETTING_KEYS", "slicer_config"]

RESULT_KINDS = ("counterfactual", "difference", "uncertainty")
SETTING_KEYS = EditSettings.keys()
_CHOICES = {f.name: f.metadata["choices"] for f in fields(EditSettings) if f.metadata["choices"]}
_UNSET = ("", "(keep)", "(unknown)", "keep", "none_given")
# keys MONAI Label itself (server, Slicer / OHIF clients) puts into an infer request: accepted and ignored
MONAI_LABEL_KEYS = frozenset({
    "model", "image", "description", "client_id", "device", "save_label", "label_tag", "label", "session",
    "session_id", "image_id", "timeout", "label_info", "result_extension", "result_dtype", "result_compress", "logging",
    "cache_transforms", "cache_transforms_in_memory", "cache_transforms_ttl", "largest_cc", "pipeline_mode",
})


class RequestError(ValueError):
    """A bad request; ``status`` is the HTTP status to answer with (4xx) and ``str(self)`` the message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class CounterfactualRequest:
    """What to compute: ``target``/``source`` attributes (raw, validated later by the model's encoder), the settings
    given (the rest are the model's defaults) and which volume to return."""

    target: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    result: str = "counterfactual"


def _first(value: Any) -> Any:
    """A Slicer drop-down arrives as the list of choices with the chosen one first."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else ""
    return value


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET)


def _as_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RequestError(f"'{name}' must be a JSON object of attributes, e.g. {{\"age\": 80}}: {e}") from None
    if not isinstance(value, Mapping):
        raise RequestError(f"'{name}' must be an object of attributes (name -> value), got {type(value).__name__}")
    return {str(k): v for k, v in value.items() if not _is_unset(_first(v))}


def parse_params(params: Mapping[str, Any] | str | None, attribute_names: tuple[str, ...] | list[str]) -> CounterfactualRequest:
    """Split raw request params into target, source, settings and result kind.

    Only the *shape* is checked here (unknown keys, JSON types, the result kind); attribute values and settings are
    validated by :meth:`monai_ld.pipeline.CounterfactualPipeline.resolve` (:class:`~monai_ld.settings.EditSettings`).

    Raises:
        RequestError: with status 400 (not JSON / not an object) or 422 (unknown key or attribute).
    """
    if params is None:
        params = {}
    if isinstance(params, str):
        try:
            params = json.loads(params) if params.strip() else {}
        except json.JSONDecodeError as e:
            raise RequestError(f"params must be a JSON object: {e}", status=400) from None
    if not isinstance(params, Mapping):
        raise RequestError(f"params must be a JSON object, got {type(params).__name__}", status=400)
    names = tuple(attribute_names)
    req = CounterfactualRequest()
    unknown = []
    for key, value in params.items():
        if key in ("target", "source"):
            continue
        if EditSettings.canonical(key):  # old names (guidance, steps) too; values are checked by EditSettings
            value = _first(value)
            if not _is_unset(value):
                req.settings[EditSettings.canonical(key)] = value
        elif key == "result":
            kind = str(_first(value)).strip().lower()
            if kind not in RESULT_KINDS:
                raise RequestError(f"result must be one of {', '.join(RESULT_KINDS)}, got {_first(value)!r}")
            req.result = kind
        elif key.startswith(("target_", "source_")):
            side, _, attr = key.partition("_")
            if attr not in names:
                raise RequestError(f"unknown attribute {attr!r} in {key!r}; this model's attributes: {', '.join(names)}")
            value = _first(value)
            if not _is_unset(value):
                getattr(req, side)[attr] = value
        elif key not in MONAI_LABEL_KEYS:
            unknown.append(key)
    if unknown:
        accepted = ["target", "source", *SETTING_KEYS, "result"] + [f"target_{n}" for n in names]
        raise RequestError(f"unknown parameter(s) {', '.join(map(repr, sorted(unknown)))}; accepted: {', '.join(accepted)}")
    for side in ("target", "source"):
        given = _as_mapping(side, params.get(side))
        bad = [k for k in given if k not in names]
        if bad:
            raise RequestError(f"unknown attribute(s) {', '.join(map(repr, bad))} in {side!r}; "
                               f"this model's attributes: {', '.join(names)}")
        getattr(req, side).update(given)
    if not req.target:
        raise RequestError(f"no target attributes given: pass params {{\"target\": {{...}}}} with any of {', '.join(names)}")
    return req


def slicer_config(encoder: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The model's config as MONAI Label's ``/info/`` shows it: one flat, typed entry per option, so 3D Slicer's
    Options table can edit it (categorical attributes as drop-downs, numbers as typed cells, defaults = the model's)."""
    cfg: dict[str, Any] = {}
    for side, unset in (("target", "(keep)"), ("source", "(unknown)")):
        for a in encoder.attributes:
            classes = getattr(a, "classes", None)
            cfg[f"{side}_{a.name}"] = [unset, *classes] if classes else ""
    for f in fields(EditSettings):
        if f.metadata["choices"]:
            continue
        value = defaults.get(f.name)
        if value is None:  # guidance_scale None = no classifier-free guidance, mask_threshold None = no mask
            cfg[f.name] = "none"
        else:
            cfg[f.name] = int(value) if f.metadata["kind"] == "int" else float(value)
    for key, choices in _CHOICES.items():
        chosen = str(defaults.get(key, choices[0]))
        cfg[key] = [chosen, *[c for c in choices if c != chosen]]
    cfg["result"] = list(RESULT_KINDS)
    return cfg
