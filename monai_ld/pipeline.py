"""File in, counterfactual out: preprocessing -> LatentDriftInferer.counterfactual -> back to the input's geometry.

``CounterfactualPipeline.from_checkpoint(path)`` is all a bundle, the CLI or the MONAI Label app needs: the
checkpoint's ``meta`` names the preprocessing chain and the default edit settings.

Outputs of :meth:`CounterfactualPipeline.run_to_dir` (never overwriting the input; each file written atomically, and
nothing written until everything has been computed):

- 3D inputs: ``counterfactual.nii.gz`` and ``difference.nii.gz`` in the input's affine and shape;
- 2D inputs (PNG/JPEG/DICOM radiographs): ``counterfactual.png`` and ``difference.png`` (plus ``.nii.gz`` copies);
- ``figure.png`` (input / counterfactual / difference) and ``record.json`` (what was done).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .conditioning import ConditionError
from .networks.model import ConditionalLDM
from .utils import atomic_write

__all__ = ["CounterfactualPipeline", "DEFAULT_SETTINGS", "build_chain", "parse_attribute_args"]

DEFAULT_SETTINGS = {"drift": 0.0, "strength": 0.6, "guidance": 3.0, "seed": 0, "num_inference_steps": 50,
                    "composition": "none", "abduction": "inversion", "mask_threshold": None}
_SETTING_KEYS = tuple(DEFAULT_SETTINGS)


def build_chain(preprocessing: Mapping[str, Any], encoder: Any = None):
    """The preprocessing ``Compose`` named by ``{"chain": "brain_mri"|"chest_xray", **kwargs}`` (training and inference
    share it, so a model always sees its inputs prepared the same way)."""
    from .transforms import brain_mri_transforms, chest_xray_transforms

    kwargs = dict(preprocessing)
    chain = kwargs.pop("chain", None)
    if encoder is not None:
        kwargs["encoder"] = encoder
    if chain == "brain_mri":
        return brain_mri_transforms(**kwargs)
    if chain == "chest_xray":
        return chest_xray_transforms(**kwargs)
    raise ValueError(f"unknown preprocessing chain {chain!r}; accepted: brain_mri, chest_xray")


def parse_attribute_args(pairs: list[str] | None) -> dict[str, str]:
    """``["age=85", "diagnosis=AD"]`` -> ``{"age": "85", "diagnosis": "AD"}`` (values validated later by the encoder)."""
    out: dict[str, str] = {}
    for p in pairs or []:
        name, sep, value = p.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConditionError(f"attribute arguments look like NAME=VALUE (e.g. age=85), got {p!r}")
        out[name.strip()] = value.strip()
    return out


def _float_or_none(value: Any) -> float | None:
    """A setting where ``None`` / ``"none"`` means off (guidance: no CFG; mask_threshold: no mask)."""
    return None if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")) else float(value)


class CounterfactualPipeline:
    """A trained :class:`ConditionalLDM` with its preprocessing and default edit settings.

    Args:
        model: the model (its ``meta["preprocessing"]`` names the chain: ``{"chain": "brain_mri"|"chest_xray", ...kwargs}``).
        defaults: edit settings overriding :data:`DEFAULT_SETTINGS` (else ``model.meta["defaults"]``).
        device: torch device.
    """

    def __init__(self, model: ConditionalLDM, defaults: Mapping[str, Any] | None = None, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.defaults = {**DEFAULT_SETTINGS, **model.meta.get("defaults", {}), **(defaults or {})}
        prep = dict(model.meta.get("preprocessing", {}))
        self.chain_name = prep.pop("chain", "brain_mri" if model.spatial_dims == 3 else "chest_xray")
        self.chain_kwargs = prep

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **defaults: Any) -> CounterfactualPipeline:
        return cls(ConditionalLDM.load(path, map_location=device), {k: v for k, v in defaults.items() if v is not None}, device)

    @property
    def encoder(self):
        return self.model.encoder

    def transform(self):
        return build_chain({"chain": self.chain_name, **self.chain_kwargs})

    # -- settings ---------------------------------------------------------------------------------------------------
    def resolve(self, target: Mapping[str, Any], source: Mapping[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
        """Validate attributes and settings; returns the full plan (clear :class:`ConditionError`/ValueError if bad)."""
        unknown = [k for k in settings if k not in _SETTING_KEYS]
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; accepted: {', '.join(_SETTING_KEYS)}")
        plan = {**self.defaults, **{k: v for k, v in settings.items() if v is not None}}
        if not target:
            raise ConditionError(f"no target attributes given; accepted: {self.encoder.describe()}")
        src = self.encoder.validate(source) if source else None
        tgt_partial = self.encoder.validate(target, partial=True)
        tgt = {**(src or {}), **tgt_partial}
        missing = [n for n in self.encoder.names if n not in tgt]
        if missing:
            raise ConditionError(
                f"target is missing {', '.join(missing)}: give every attribute in the target, or give the input's own "
                f"attributes as the source (the target then changes only what it names). Accepted: {self.encoder.describe()}")
        try:
            plan["drift"] = float(plan["drift"])
            plan["strength"] = float(plan["strength"])
            plan["guidance"] = _float_or_none(plan["guidance"])
            plan["seed"] = int(plan["seed"])
            plan["num_inference_steps"] = int(plan["num_inference_steps"])
            plan["mask_threshold"] = _float_or_none(plan.get("mask_threshold"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad setting value: {e}") from None
        if not 0.0 <= plan["strength"] <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {plan['strength']}")
        if not -1.0 <= plan["drift"] <= 1.0:
            raise ValueError(f"drift must be in [-1, 1] (typical: -0.2..0.2), got {plan['drift']}")
        if plan["guidance"] is not None and not 0.0 <= plan["guidance"] <= 50.0:
            raise ValueError(f"guidance must be in [0, 50] or none, got {plan['guidance']}")
        if plan["mask_threshold"] is not None and not 0.0 < plan["mask_threshold"] < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1) or none (no mask), got {plan['mask_threshold']}")
        if not 1 <= plan["num_inference_steps"] <= int(self.model.scheduler_config.get("num_train_timesteps", 1000)):
            raise ValueError(f"num_inference_steps must be in [1, num_train_timesteps], got {plan['num_inference_steps']}")
        plan.update(source=src, target=tgt)
        return plan

    # -- the edit ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, image: torch.Tensor, plan: Mapping[str, Any]):
        """Counterfactual of preprocessed images ``(B, C, *spatial)`` under a resolved ``plan``."""
        torch.manual_seed(plan["seed"])
        inferer = self.model.make_inferer(plan["num_inference_steps"])
        b = image.shape[0]
        target = self.model.condition([plan["target"]] * b)
        source = self.model.condition([plan["source"]] * b) if plan.get("source") else None
        return inferer.counterfactual(
            image.to(self.device), self.model.autoencoder, self.model.unet, source, target,
            strength=plan["strength"], guidance_scale=plan["guidance"], drift=plan["drift"], mode=self.model.mode,
            composition=plan.get("composition", "none"), abduction=plan.get("abduction", "inversion"),
            mask_threshold=plan.get("mask_threshold"),
            generator=torch.Generator(device=self.device).manual_seed(plan["seed"]),
        )

    def __call__(self, input_path: str | os.PathLike, target: Mapping[str, Any], source: Mapping[str, Any] | None = None,
                 **settings: Any) -> dict[str, Any]:
        """Counterfactual of the file ``input_path``; returns tensors in the input's space plus the record."""
        from .transforms import restore_to_input_space

        plan = self.resolve(target, source, **settings)
        path = Path(input_path)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        t0 = time.perf_counter()
        transform = self.transform()
        data = transform({"image": str(path)})
        x = data["image"]
        out = self.edit(x.unsqueeze(0).float(), plan)
        cf = out.image[0].cpu()
        diff = out.difference[0].cpu()
        cf_in = restore_to_input_space(cf, data, transform)
        diff_in = restore_to_input_space(diff, data, transform)
        x_in = restore_to_input_space(x, data, transform)
        record = {
            "input": str(path.resolve()),
            "model": {"spatial_dims": self.model.spatial_dims, "attributes": self.encoder.to_config(),
                      "preprocessing": {"chain": self.chain_name, **self.chain_kwargs}},
            "source": plan["source"], "source_mode": "given" if plan["source"] else "null (unconditional abduction)",
            "target": plan["target"],
            "drift": plan["drift"], "strength": plan["strength"], "guidance": plan["guidance"], "seed": plan["seed"],
            "num_inference_steps": plan["num_inference_steps"], "composition": plan["composition"],
            "abduction": plan["abduction"], "mask_threshold": plan["mask_threshold"], "denoising_steps": out.settings["steps"],
            "intensity": "model scale [0, 1] after percentile normalisation (not the input's raw intensities)",
            "seconds": round(time.perf_counter() - t0, 2),
        }
        return {"counterfactual": cf_in, "difference": diff_in, "input": x_in, "model_space": {"input": x, "counterfactual": cf},
                "record": record, "reference": data["image"]}

    # -- writing ----------------------------------------------------------------------------------------------------
    def run_to_dir(self, input_path: str | os.PathLike, output_dir: str | os.PathLike, target: Mapping[str, Any],
                   source: Mapping[str, Any] | None = None, overwrite: bool = False, **settings: Any) -> dict[str, str]:
        """Compute the counterfactual of ``input_path`` and write the outputs into ``output_dir``; returns their paths."""
        from .transforms import save_like_input

        out_dir = Path(output_dir)
        in_path = Path(input_path).resolve()
        is_2d = self.model.spatial_dims == 2
        names = {"counterfactual": "counterfactual.nii.gz", "difference": "difference.nii.gz", "figure": "figure.png",
                 "record": "record.json"}
        if is_2d:
            names.update(counterfactual_png="counterfactual.png", difference_png="difference.png")
        targets = {k: out_dir / v for k, v in names.items()}
        for p in targets.values():
            if p.resolve() == in_path:
                raise ValueError(f"refusing to write {p}: it is the input file")
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p} exists; choose another --output-dir or pass overwrite")
        result = self(input_path, target, source, **settings)  # everything computed before anything is written
        out_dir.mkdir(parents=True, exist_ok=True)
        ref = result["reference"]
        save_like_input(result["counterfactual"], targets["counterfactual"], reference=ref, overwrite=overwrite)
        save_like_input(result["difference"], targets["difference"], reference=ref, overwrite=overwrite)
        if is_2d:
            _write_png(_as_2d(result["counterfactual"]), targets["counterfactual_png"], (0.0, 1.0), _png_bits(in_path))
            _write_png(_as_2d(result["difference"]), targets["difference_png"], None)
        _write_figure(result, targets["figure"], self.model.spatial_dims)
        record = {**result["record"], "outputs": {k: str(v) for k, v in targets.items()}}
        atomic_write(targets["record"], lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        return {k: str(v) for k, v in targets.items()}


def _as_2d(t: torch.Tensor) -> np.ndarray:
    a = np.asarray(t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float32)
    while a.ndim > 2:
        a = a[0]
    return a.T  # MONAI's 2D arrays are (columns, rows): transpose back to image rows


def _png_bits(path: Path) -> int:
    """8 for an 8-bit image file (PNG/JPEG/BMP in L/RGB modes), else 16 (16-bit PNG, DICOM, NIfTI, ...)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return 8 if im.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else 16
    except (UnidentifiedImageError, OSError):
        return 16


def _write_png(a: np.ndarray, path: Path, value_range: tuple[float, float] | None, bits: int = 8) -> None:
    """Grayscale at ``bits`` (8 or 16) for images (``value_range``), RGB diverging colour map for a difference
    (symmetric range)."""
    from PIL import Image

    if value_range is not None:
        lo, hi = value_range
        top, dtype = (65535, np.uint16) if bits == 16 else (255, np.uint8)
        img = Image.fromarray((np.clip((a - lo) / (hi - lo), 0, 1) * top).round().astype(dtype))
    else:
        import matplotlib

        m = float(np.abs(a).max()) or 1.0
        rgba = matplotlib.colormaps["RdBu_r"]((a / m + 1) / 2)
        img = Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8), mode="RGB")
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _slices(vol: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Middle axial, coronal and sagittal slices of a RAS-ish ``(X, Y, Z)`` volume, oriented for display."""
    x, y, z = (s // 2 for s in vol.shape)
    return [("axial", np.rot90(vol[:, :, z])), ("coronal", np.rot90(vol[:, y, :])), ("sagittal", np.rot90(vol[x, :, :]))]


def _write_figure(result: Mapping[str, Any], path: Path, spatial_dims: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result["model_space"]
    x = np.asarray(ms["input"][0].cpu(), dtype=np.float32)
    cf = np.asarray(ms["counterfactual"][0].cpu(), dtype=np.float32)
    d = cf - x
    rec = result["record"]
    if spatial_dims == 3:
        rows = list(zip(_slices(x), _slices(cf), _slices(d)))
    else:
        rows = [(("", x.T), ("", cf.T), ("", d.T))]
    m = float(np.abs(d).max()) or 1.0
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 3.1 * len(rows) + 0.6), squeeze=False, layout="constrained")
    for r, ((name, a), (_, b), (_, c)) in enumerate(rows):
        axes[r, 0].imshow(a, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(b, cmap="gray", vmin=0, vmax=1)
        im = axes[r, 2].imshow(c, cmap="RdBu_r", vmin=-m, vmax=m)
        axes[r, 0].set_ylabel(name)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("input")
    axes[0, 1].set_title("counterfactual")
    axes[0, 2].set_title("difference (cf - input)")
    fig.colorbar(im, ax=axes[:, 2].tolist(), shrink=0.8, aspect=30)
    tgt = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec["target"].items())
    src = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (rec["source"] or {}).items()) or "null"
    fig.suptitle(f"source: {src}\ntarget: {tgt}\nδ={rec['drift']:g}, strength={rec['strength']:g}, "
                 f"guidance={rec['guidance']}, composition={rec['composition']}, seed={rec['seed']}"
                 + (f", mask={rec['mask_threshold']:g}" if rec.get("mask_threshold") is not None else ""), fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
    plt.close(fig)
