"""Networks defined by a MONAI model-zoo generative bundle (an unpacked bundle folder), ready for LD fine-tuning.

A bundle's ``configs/inference.json`` defines the networks as ``_target_`` dicts (the brain LDM bundle:
``autoencoder_def`` + ``diffusion_def``, ``network_def`` = ``@autoencoder_def``; MAISI: ``autoencoder_def`` +
``diffusion_unet_def``) and names its weight files (``load_diffusion_path`` / ``load_autoencoder_path``;
``trained_diffusion_path`` / ``trained_autoencoder_path``). :func:`load_zoo_bundle` instantiates them with MONAI's
``ConfigParser`` (nothing of the bundle is copied) and loads the weights; :class:`ZooDenoiser` adapts the network's
conditioning to the ``(x, timesteps, context)`` call of :class:`monai_ld.LatentDriftInferer`. See docs/model_zoo.md.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

__all__ = ["ZooBundle", "ZooDenoiser", "load_zoo_bundle", "unet_state_container"]

UNET_KEYS = ("diffusion_def", "diffusion_unet_def", "network_def")
UNET_PATH_KEYS = ("load_diffusion_path", "trained_diffusion_path")
AE_PATH_KEYS = ("load_autoencoder_path", "trained_autoencoder_path")


@dataclass
class ZooBundle:
    """What :func:`load_zoo_bundle` found.

    Attributes:
        root: the bundle folder. parser: its parsed ``ConfigParser`` (``bundle_root`` set to ``root``).
        unet, autoencoder: the instantiated networks with their weights (``autoencoder`` None when not asked for).
        unet_key, unet_weights: which config key / file the diffusion network came from.
        checkpoint: the diffusion weights file's content as loaded (a state dict, or a dict holding one under
            ``unet_state_dict`` as MAISI's does), kept so a fine-tuned state is written back in the same layout.
        scale_factor: the latent scale (MAISI: the checkpoint's ``scale_factor``; else the config's, else 1.0).
    """

    root: Path
    parser: ConfigParser
    unet: nn.Module
    autoencoder: nn.Module | None
    unet_key: str
    unet_weights: Path | None
    checkpoint: Any = None
    scale_factor: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)


def _state_dict(obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("unet_state_dict", "state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
    return obj


def unet_state_container(checkpoint: Any, state_dict: Mapping[str, torch.Tensor]) -> Any:
    """``state_dict`` in the layout ``checkpoint`` had (a bare state dict, or a dict with ``unet_state_dict``...)."""
    if isinstance(checkpoint, Mapping):
        for key in ("unet_state_dict", "state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                return {**checkpoint, key: dict(state_dict)}
    return dict(state_dict)


def _config_path(parser: ConfigParser, keys: Sequence[str]) -> Path | None:
    for key in keys:
        if key in parser:
            return Path(str(parser.get_parsed_content(key)))
    return None


def _load(net: nn.Module, ckpt: Any, old_format: bool) -> None:
    sd = _state_dict(ckpt)
    if old_format and hasattr(net, "load_old_state_dict"):
        net.load_old_state_dict(sd)  # weights saved by MONAI Generative (the brain LDM bundle: "load_old": 1)
    else:
        net.load_state_dict(sd)


def load_zoo_bundle(
    bundle_dir: str | Path,
    config: str = "configs/inference.json",
    unet_key: str | None = None,
    autoencoder_key: str | None = "autoencoder_def",
    unet_weights: str | Path | None = None,
    autoencoder_weights: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    old_format: bool | None = None,
    device: str | torch.device = "cpu",
) -> ZooBundle:
    """Instantiate a model-zoo bundle's diffusion network (and autoencoder) from its config and load its weights.

    Args:
        bundle_dir: the unpacked bundle folder (``configs/``, ``models/``).
        config: the config file, relative to ``bundle_dir``.
        unet_key: the diffusion network's config key; default: the first of ``diffusion_def``, ``diffusion_unet_def``,
            ``network_def`` present (``network_def`` is the autoencoder in the brain LDM bundle, hence last).
        autoencoder_key: the autoencoder's key (None: do not build it).
        unet_weights, autoencoder_weights: weight files; default: the config's ``load_diffusion_path`` /
            ``trained_diffusion_path`` (``load_autoencoder_path`` / ``trained_autoencoder_path``), else
            ``models/model.pt`` for the diffusion network. A missing default file leaves random weights only when
            the path was not given explicitly (an explicit missing file raises).
        overrides: config ids set before parsing, e.g. ``{"diffusion_unet_def#use_flash_attention": False}``.
        old_format: load with ``load_old_state_dict`` (MONAI Generative-era weights); default: the config's
            ``load_old`` flag.
    """
    root = Path(bundle_dir).resolve()
    parser = ConfigParser()
    parser.read_config(str(root / config))
    parser["bundle_root"] = str(root)
    for k, v in (overrides or {}).items():
        parser[k] = v
    sys.path.insert(0, str(root))  # bundle configs may `$import scripts` from their own folder
    try:
        key = unet_key or next((k for k in UNET_KEYS if k in parser), None)
        if key is None:
            raise KeyError(f"no diffusion network in {root / config}; looked for {UNET_KEYS} (pass unet_key)")
        unet = parser.get_parsed_content(key, instantiate=True)
        ae = parser.get_parsed_content(autoencoder_key, instantiate=True) if autoencoder_key else None
        if ae is unet:
            raise ValueError(f"{key!r} and {autoencoder_key!r} are the same network; pass unet_key (e.g. 'diffusion_def')")
        old = bool(parser.get("load_old", 0)) if old_format is None else bool(old_format)
        u_path = Path(unet_weights) if unet_weights else (_config_path(parser, UNET_PATH_KEYS) or root / "models" / "model.pt")
        a_path = Path(autoencoder_weights) if autoencoder_weights else _config_path(parser, AE_PATH_KEYS)
        scale = parser.get("scale_factor", 1.0)
    finally:
        sys.path.remove(str(root))
    ckpt = None
    for net, path, explicit in ((unet, u_path, unet_weights), (ae, a_path, autoencoder_weights)):
        if net is None or path is None:
            continue
        if not path.is_file():
            if explicit:
                raise FileNotFoundError(path)
            continue
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        _load(net, loaded, old)
        if net is unet:
            ckpt = loaded
    if isinstance(ckpt, Mapping) and "scale_factor" in ckpt:
        scale = ckpt["scale_factor"]
    scale = float(scale) if isinstance(scale, (int, float, torch.Tensor)) else 1.0
    return ZooBundle(root=root, parser=parser, unet=unet.to(device), autoencoder=None if ae is None else ae.to(device),
                     unet_key=key, unet_weights=u_path if u_path.is_file() else None, checkpoint=ckpt,
                     scale_factor=scale, meta={"config": config, "old_format": old})


class ZooDenoiser(nn.Module):
    """A zoo diffusion network behind the ``(x, timesteps, context)`` call LD's inferer and trainer make.

    Args:
        unet: the bundle's diffusion network.
        cross_attention: pass ``context`` ``(B, 1, dim)`` as the network's cross-attention context.
        concat: also append ``context`` broadcast over space as ``dim`` extra input channels (the brain LDM bundle
            does both: its UNet has ``in_channels = 3 latent + 4 condition``).
        static_inputs: extra keyword tensors the network needs at every call, e.g. MAISI's
            ``spacing_tensor`` ``(1, 3)`` and ``class_labels`` ``(1,)``; a batch of 1 is expanded to the call's batch.

    Shapes: ``x`` ``(B, C_lat, *spatial)``; returns the network's ``(B, C_lat, *spatial)`` prediction.
    """

    def __init__(self, unet: nn.Module, cross_attention: bool = True, concat: bool = False,
                 static_inputs: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.unet, self.cross_attention, self.concat = unet, bool(cross_attention), bool(concat)
        self.static_inputs = dict(static_inputs or {})

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        if timesteps.ndim == 1 and timesteps.shape[0] == 1 and b > 1:
            timesteps = timesteps.expand(b)  # MONAI's inferers pass one timestep; MAISI adds embeddings in place
        kw = {k: (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v).to(x.device) for k, v in self.static_inputs.items()}
        if self.concat:
            if context is None:
                raise ValueError("this network takes its condition as input channels: a context is required")
            c = context.reshape(context.shape[0], -1, *[1] * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, c.to(x)], dim=1)
        return self.unet(x=x, timesteps=timesteps, context=context if self.cross_attention else None, **kw)
