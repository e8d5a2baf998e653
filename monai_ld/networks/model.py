"""``ConditionalLDM``: the whole counterfactual model in one object and one checkpoint file.

A checkpoint is a ``torch.save``'d dict of tensors and JSON types only (so ``torch.load(weights_only=True)``
reads it), written atomically::

    {"format": "monai_ld.ldm/1",
     "autoencoder": {"config": {...AutoencoderKL kwargs}, "state_dict": {...}},
     "unet":        {"config": {...DiffusionModelUNet kwargs}, "state_dict": {...}},
     "attributes":  [...AttributeEncoder.to_config()],
     "scale_factor": float,
     "scheduler":   {...presets.scheduler_config()},
     "drift":       {"drift": float, "target": "shifted"|"unshifted", "initial_noise": bool},
     "conditioning": {"mode": "crossattn"|"concat"},
     "meta":        {...free JSON: spatial size, spacing, intensity range, training record}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import AttributeEncoder
from ..utils import atomic_write
from .presets import build_autoencoder, build_scheduler, build_unet, scheduler_config

__all__ = ["CHECKPOINT_FORMAT", "ConditionalLDM", "atomic_torch_save"]

CHECKPOINT_FORMAT = "monai_ld.ldm/1"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path`` then ``os.replace``: never a half-written file."""
    return Path(atomic_write(path, lambda tmp: torch.save(obj, tmp)))


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON: configs in a checkpoint hold only types ``weights_only`` loading accepts."""
    return json.loads(json.dumps(obj))


class ConditionalLDM(nn.Module):
    """Autoencoder + conditional diffusion UNet + attribute specs + scheduler + LD settings.

    Args:
        autoencoder_config / unet_config: kwargs of ``AutoencoderKL`` / ``DiffusionModelUNet`` (see ``presets``).
        attributes: an :class:`AttributeEncoder` or its config list.
        scale_factor: latent scale (``1 / std`` of the training latents is the usual choice).
        scheduler: :func:`presets.scheduler_config` dict.
        drift, drift_initial_noise: LD defaults (:func:`monai_ld.inferers.make_inferer` builds the inferer from them).
        drift_target: the training target, recorded (its meaning and validation are the training engines':
            :class:`monai_ld.drift.DriftTarget`).
        mode: ``"crossattn"`` (context ``(B, 1, dim)``) or ``"concat"``.
        meta: free JSON-able facts (image size, spacing, preprocessing, training record).
    """

    def __init__(
        self,
        autoencoder_config: Mapping[str, Any],
        unet_config: Mapping[str, Any],
        attributes: AttributeEncoder | list,
        scale_factor: float = 1.0,
        scheduler: Mapping[str, Any] | None = None,
        drift: float = 0.0,
        drift_target: str = "shifted",
        drift_initial_noise: bool = False,
        mode: str = "crossattn",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("crossattn", "concat"):
            raise ValueError(f"mode must be 'crossattn' or 'concat', got {mode!r}")
        self.encoder = attributes if isinstance(attributes, AttributeEncoder) else AttributeEncoder.from_config(attributes)
        self.autoencoder_config = _jsonable(dict(autoencoder_config))
        self.unet_config = _jsonable(dict(unet_config))
        if mode == "crossattn" and self.unet_config.get("cross_attention_dim") not in (None, self.encoder.dim):
            raise ValueError(f"UNet cross_attention_dim {self.unet_config['cross_attention_dim']} != attribute code size {self.encoder.dim}")
        self.autoencoder = build_autoencoder(self.autoencoder_config)
        self.unet = build_unet(self.unet_config)
        self.scale_factor = float(scale_factor)
        self.scheduler_config = _jsonable(dict(scheduler or scheduler_config()))
        self.drift = float(drift)
        self.drift_target = str(drift_target)
        self.drift_initial_noise = bool(drift_initial_noise)
        self.mode = mode
        self.meta = _jsonable(dict(meta or {}))

    @property
    def spatial_dims(self) -> int:
        return int(self.autoencoder_config["spatial_dims"])

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder_config.get("latent_channels", 3))

    def make_scheduler(self, num_inference_steps: int | None = None):
        return build_scheduler(self.scheduler_config, num_inference_steps)

    def condition(self, rows: Any, batch_size: int = 1) -> torch.Tensor:
        """Attribute rows -> cross-attention context ``(B, 1, dim)`` (``None`` -> null condition)."""
        return self.encoder.context(rows, batch_size).to(next(self.unet.parameters()).device)

    # -- persistence ------------------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "autoencoder": {"config": self.autoencoder_config, "state_dict": self.autoencoder.state_dict()},
            "unet": {"config": self.unet_config, "state_dict": self.unet.state_dict()},
            "attributes": self.encoder.to_config(),
            "scale_factor": self.scale_factor,
            "scheduler": self.scheduler_config,
            "drift": {"drift": self.drift, "target": self.drift_target, "initial_noise": self.drift_initial_noise},
            "conditioning": {"mode": self.mode},
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the whole model to one file, atomically."""
        return atomic_torch_save(self.checkpoint(), path)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> ConditionalLDM:
        if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
            found = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
            raise ValueError(f"not a monai_ld checkpoint (format {found!r}; expected {CHECKPOINT_FORMAT!r})")
        drift = ckpt.get("drift", {})
        model = cls(
            autoencoder_config=ckpt["autoencoder"]["config"],
            unet_config=ckpt["unet"]["config"],
            attributes=ckpt["attributes"],
            scale_factor=ckpt.get("scale_factor", 1.0),
            scheduler=ckpt.get("scheduler"),
            drift=drift.get("drift", 0.0),
            drift_target=drift.get("target", "shifted"),
            drift_initial_noise=drift.get("initial_noise", False),
            mode=ckpt.get("conditioning", {}).get("mode", "crossattn"),
            meta=ckpt.get("meta"),
        )
        model.autoencoder.load_state_dict(ckpt["autoencoder"]["state_dict"])
        model.unet.load_state_dict(ckpt["unet"]["state_dict"])
        return model

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> ConditionalLDM:
        """Read a checkpoint written by :meth:`save` (``weights_only=True``: no code is executed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # corrupt or foreign pickle
            raise ValueError(f"cannot read checkpoint {path}: {e}") from e
        return cls.from_checkpoint(ckpt).eval()
