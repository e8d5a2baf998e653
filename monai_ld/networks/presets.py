"""Matching AutoencoderKL + DiffusionModelUNet (+ scheduler) configurations, 2D and 3D.

Sizes:
- ``"tiny"``: for tests (a forward pass in milliseconds).
- ``"small"``: CPU-trainable (2D 128² -> latent 32², 3D 64³ -> latent 16³; see ENVIRONMENT.md's cost table).
- ``"large"``: a GPU size in the spirit of MONAI's Brain LDM (channels 64/128/128/128 in the autoencoder).

Every config is a plain dict of JSON types so it can live in a bundle config and in a ``weights_only`` checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, PNDMScheduler, RFlowScheduler

__all__ = ["SIZES", "autoencoder_config", "unet_config", "scheduler_config", "build_autoencoder", "build_unet", "build_scheduler",
           "AttributeUNet"]

SIZES = ("tiny", "small", "large")

_AE = {
    "tiny": dict(channels=[8, 16], num_res_blocks=1, attention_levels=[False, False], norm_num_groups=8,
                 with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
    "small": dict(channels=[32, 64, 64], num_res_blocks=1, attention_levels=[False, False, False], norm_num_groups=16,
                  with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
    "large": dict(channels=[64, 128, 128, 128], num_res_blocks=2, attention_levels=[False, False, False, False],
                  norm_num_groups=32, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
}
_UNET = {
    "tiny": dict(channels=[16, 32], num_res_blocks=1, attention_levels=[False, True], norm_num_groups=8, num_head_channels=[0, 16]),
    "small": dict(channels=[32, 64, 64], num_res_blocks=1, attention_levels=[False, True, True], norm_num_groups=16,
                  num_head_channels=[0, 32, 32]),
    "large": dict(channels=[128, 256, 512], num_res_blocks=2, attention_levels=[False, True, True], norm_num_groups=32,
                  num_head_channels=[0, 64, 64]),
}


def _check(spatial_dims: int, size: str) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def autoencoder_config(spatial_dims: int, size: str = "small", in_channels: int = 1, latent_channels: int = 3) -> dict[str, Any]:
    """``AutoencoderKL`` kwargs; the latent is ``2**(len(channels)-1)`` times smaller per spatial axis."""
    _check(spatial_dims, size)
    return {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": in_channels,
            "latent_channels": latent_channels, **_AE[size]}


def unet_config(spatial_dims: int, latent_channels: int = 3, context_dim: int | None = None, size: str = "small",
                concat_channels: int = 0) -> dict[str, Any]:
    """``DiffusionModelUNet`` kwargs; cross-attention on ``context_dim`` when given, ``concat_channels`` extra inputs."""
    _check(spatial_dims, size)
    cfg = {"spatial_dims": spatial_dims, "in_channels": latent_channels + concat_channels, "out_channels": latent_channels,
           **_UNET[size]}
    if context_dim:
        cfg.update(with_conditioning=True, cross_attention_dim=int(context_dim))
    else:
        cfg.update(attention_levels=[False] * len(cfg["channels"]), num_head_channels=8)
    return cfg


def scheduler_config(name: str = "DDIM", num_train_timesteps: int = 1000, num_inference_steps: int = 50,
                     schedule: str = "scaled_linear_beta", beta_start: float = 0.0015, beta_end: float = 0.0205,
                     prediction_type: str = "epsilon") -> dict[str, Any]:
    """Scheduler settings as MONAI's Brain LDM bundle uses them (scaled-linear betas 0.0015-0.0205).

    ``name="RFlow"`` gives MONAI's rectified flow instead (velocity prediction; no betas): uniform discrete training
    timesteps, no resolution-dependent timestep transform. Its dict also accepts ``sample_method``, ``loc``,
    ``scale``, ``use_timestep_transform`` (then ``input_img_size_numel``, ``base_img_size_numel``, ``spatial_dim``),
    ``transform_scale``, ``steps_offset`` (``RFlowScheduler``'s arguments).
    """
    if str(name).upper() == "RFLOW":
        return {"name": "RFlow", "num_train_timesteps": num_train_timesteps, "num_inference_steps": num_inference_steps,
                "use_discrete_timesteps": True, "sample_method": "uniform", "use_timestep_transform": False}
    return {"name": name, "num_train_timesteps": num_train_timesteps, "num_inference_steps": num_inference_steps,
            "schedule": schedule, "beta_start": beta_start, "beta_end": beta_end, "prediction_type": prediction_type}


def build_autoencoder(config: dict[str, Any]) -> AutoencoderKL:
    return AutoencoderKL(**config)


class AttributeUNet(DiffusionModelUNet):
    """MONAI's ``DiffusionModelUNet`` whose time embedding also carries the attribute code (``unet_config``'s
    ``"condition_embedding": true``): MONAI's class-label embedding generalised to a code vector, an MLP of the
    condition added to the time embedding, so every residual block at every resolution sees the attributes (cross-
    attention sees them only at its attention levels). Called as any UNet here, ``unet(x, timesteps, context=code)``;
    the MLP reads the same ``(N, 1, dim)`` code. Its last layer starts at zero: a network given this path later (an
    older checkpoint's weights) computes exactly what it did until training moves it."""

    def __init__(self, condition_embedding: bool = True, **config: Any):
        super().__init__(**config)
        if not config.get("with_conditioning") or not config.get("cross_attention_dim"):
            raise ValueError("condition_embedding needs with_conditioning=True and cross_attention_dim (the code size)")
        dim, emb = int(config["cross_attention_dim"]), self.time_embed[-1].out_features
        self.num_class_embeds = dim  # MONAI's forward adds self.class_embedding(class_labels) to the time embedding
        self.class_embedding = torch.nn.Sequential(torch.nn.Linear(dim, emb), torch.nn.SiLU(), torch.nn.Linear(emb, emb))
        torch.nn.init.zeros_(self.class_embedding[-1].weight)
        torch.nn.init.zeros_(self.class_embedding[-1].bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if class_labels is None:
            if context is None:
                raise ValueError("AttributeUNet needs the attribute code (context, (N, 1, dim))")
            class_labels = context.reshape(context.shape[0], -1)
        return super().forward(x, timesteps, context=context, class_labels=class_labels, **kwargs)


def build_unet(config: dict[str, Any]) -> DiffusionModelUNet:
    """The UNet of a config dict: :class:`AttributeUNet` when it says ``"condition_embedding": true``."""
    cfg = dict(config)
    if cfg.pop("condition_embedding", False):
        return AttributeUNet(**cfg)
    return DiffusionModelUNet(**cfg)


def _build_rflow(cfg: dict[str, Any], steps: int) -> RFlowScheduler:
    # a DDPM-style dict switched to RFlow by its name keeps betas that do not apply; a non-velocity target would
    # silently train the wrong thing, so that one is refused
    for key in ("schedule", "beta_start", "beta_end"):
        cfg.pop(key, None)
    pred = cfg.pop("prediction_type", "v_prediction")
    if pred != "v_prediction":
        raise ValueError(f"RFlow predicts the velocity z_0 - noise: prediction_type must be 'v_prediction' or absent, got {pred!r}")
    numel = cfg.pop("input_img_size_numel", None)
    if cfg.get("use_timestep_transform") and numel is None:
        raise ValueError("RFlow with use_timestep_transform needs input_img_size_numel (latent H*W[*D]) in the scheduler dict")
    sched = RFlowScheduler(**cfg)
    sched.set_timesteps(steps, input_img_size_numel=numel)
    return sched


def build_scheduler(config: dict[str, Any], num_inference_steps: int | None = None):
    """A MONAI scheduler from :func:`scheduler_config`'s dict (``name``: DDIM, DDPM, PNDM or RFlow), timesteps set for
    inference."""
    cfg = dict(config)
    name = str(cfg.pop("name", "DDIM")).upper()
    steps = int(num_inference_steps or cfg.pop("num_inference_steps", 50))
    cfg.pop("num_inference_steps", None)
    if name == "RFLOW":
        return _build_rflow(cfg, steps)
    common = dict(num_train_timesteps=cfg.pop("num_train_timesteps"), schedule=cfg.pop("schedule"),
                  prediction_type=cfg.pop("prediction_type", "epsilon"), **cfg)
    if name == "DDIM":
        sched = DDIMScheduler(clip_sample=False, **common)
    elif name == "DDPM":
        sched = DDPMScheduler(clip_sample=False, **common)
    elif name == "PNDM":
        common.pop("prediction_type")
        sched = PNDMScheduler(skip_prk_steps=True, **common)
    else:
        raise ValueError(f"unknown scheduler {name!r}; accepted: DDIM, DDPM, PNDM, RFlow")
    sched.set_timesteps(steps)
    return sched
