"""Which models the MONAI Label app serves: one per bundle, named after the bundle folder.

A model is a checkpoint ``<bundle>/models/model.pt`` (the format :meth:`monai_ld.ConditionalLDM.save` writes). Sources,
in order of precedence:

1. an explicit mapping ``{"name": "<bundle dir or .pt file>"}`` (app conf ``models``: ``name=path,name2=path2``);
2. every sub-folder of a bundles folder that holds ``models/model.pt`` (app conf ``bundles``; default: the
   repository's ``bundles/`` beside the ``monai_ld`` package, or ``$MONAI_LD_BUNDLES``).

Bundles whose weights are not there (yet) are reported and skipped, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..bundles import BUNDLE_NAMES, bundles_dir

__all__ = ["KNOWN_BUNDLES", "default_bundles_dir", "discover_models", "parse_models_conf", "checkpoint_of"]

logger = logging.getLogger(__name__)

KNOWN_BUNDLES = BUNDLE_NAMES
default_bundles_dir = bundles_dir  # the one bundle locator's folder


def checkpoint_of(path: str | os.PathLike) -> Path:
    """``<bundle>/models/model.pt`` for a bundle folder, or the path itself for a checkpoint file."""
    p = Path(path).expanduser()
    return p / "models" / "model.pt" if p.is_dir() else p


def parse_models_conf(text: str) -> dict[str, str]:
    """``"brain_mri_counterfactual=/b/brain,chest=/c/model.pt"`` -> mapping (a bare path is named after its folder)."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep:
            path = name
            p = Path(path)
            name = p.name if p.is_dir() else p.parent.parent.name
        if not name.strip() or not path.strip():
            raise ValueError(f"models look like NAME=PATH[,NAME=PATH...], got {item!r}")
        out[name.strip()] = path.strip()
    return out


def discover_models(bundles_dir: str | os.PathLike | None = None,
                    models: Mapping[str, str | os.PathLike] | None = None) -> dict[str, Path]:
    """Model name -> checkpoint path of every model that can be served (see the module docstring)."""
    found: dict[str, Path] = {}
    if models:
        for name, path in models.items():
            ckpt = checkpoint_of(path)
            if ckpt.is_file():
                found[name] = ckpt
            else:
                logger.warning("model %s: no checkpoint at %s; not served", name, ckpt)
        return found
    root = Path(bundles_dir) if bundles_dir else default_bundles_dir()
    if not root.is_dir():
        logger.warning("bundles folder %s does not exist; no models served", root)
        return found
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        ckpt = checkpoint_of(d)
        if ckpt.is_file():
            found[d.name] = ckpt
        elif d.name in KNOWN_BUNDLES or (d / "configs").is_dir():
            logger.warning("bundle %s has no weights at %s yet; not served", d.name, ckpt)
    return found
