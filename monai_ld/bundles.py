"""One bundle locator for every command: a bundle name, an alias or a folder -> the bundle folder.

Bundles live in the repository's ``bundles/`` beside the installed package (an editable install of a clone), or in
``$MONAI_LD_BUNDLES``. A bundle folder is one that holds ``configs/metadata.json``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

__all__ = ["BUNDLE_NAMES", "ALIASES", "bundles_dir", "resolve_bundle", "parse_overrides", "config_value"]

BUNDLE_NAMES = ("brain_mri_counterfactual", "chest_xray_counterfactual")
ALIASES = {"brain": BUNDLE_NAMES[0], "cxr": BUNDLE_NAMES[1], "chest": BUNDLE_NAMES[1]}


def bundles_dir() -> Path:
    """``$MONAI_LD_BUNDLES``, else the repository's ``bundles/`` folder beside the ``monai_ld`` package."""
    env = os.environ.get("MONAI_LD_BUNDLES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "bundles"


def resolve_bundle(value: str | os.PathLike, needs: str = "configs/metadata.json") -> Path:
    """The bundle folder for a path, a bundle name (``brain_mri_counterfactual``) or an alias (``brain``, ``cxr``,
    ``chest``) that holds ``needs`` (the file the command reads; a model-zoo bundle's ``configs/metadata.json`` by
    default); one clear error naming what is accepted otherwise."""
    p = Path(value).expanduser()
    known_name = str(value) in ALIASES or str(value) in BUNDLE_NAMES
    if not p.is_dir() or (known_name and not (p / needs).is_file()):  # a same-named folder in the cwd does not hide it
        p = bundles_dir() / ALIASES.get(str(value), str(value))
    if not (p / needs).is_file():
        known = ", ".join([*BUNDLE_NAMES, *ALIASES])
        where = f"no {needs} under {p}" if p.is_dir() else f"folder {p} does not exist"
        raise FileNotFoundError(f"{str(value)!r} is not a bundle ({where}); accepted: {known}, or a bundle folder")
    return p


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` items -> ``{KEY: VALUE}`` (VALUE as typed): the bundle config keys a command overrides, as
    ``python -m monai.bundle run --KEY VALUE`` would (``phantoms#n=12``, ``diffusion#batch_size=8``)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip().startswith("-"):
            raise ValueError(f"--set takes KEY=VALUE with a bundle config key (e.g. phantoms#n=12), got {item!r}")
        out[key.strip()] = value
    return out


def config_value(text: str):
    """A ``--set`` VALUE as the config gets it: a Python literal (``12``, ``[8, 16]``, ``{'a': False}``, ``None``) when
    it is one, else the string (a path, ``$@bundle_root + '/x'``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
