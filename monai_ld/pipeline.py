"""File in, counterfactual out: preprocessing -> LatentDriftInferer.counterfactual -> back to the input's space.

A bundle's ``configs/inference.json`` builds the pipeline from components (model, inferer over a scheduler,
preprocessing transform, :class:`~monai_ld.settings.EditSettings`); ``CounterfactualPipeline.from_checkpoint(path)``
builds the same from the checkpoint alone: its ``meta`` names the preprocessing chain and the default edit settings.

Two output spaces (setting ``output_space``):

- ``"native"`` (default): counterfactual = input + Δ on the input's own grid, in its units and dtype, where Δ is the
  model's change taken back through the inverse preprocessing and restricted to the edit region (automatic DiffEdit
  mask, user ``edit_mask`` / ``keep_mask``); voxels outside it are the input's own (:mod:`monai_ld.composition`);
- ``"model"``: the model's whole output resampled to the input's geometry (model intensity scale ``[0, 1]``).

``samples`` > 1 edits N copies in one batch (seeds ``seed, seed+1, ...``): the mean is the counterfactual and the
per-voxel standard deviation the uncertainty.

Outputs of :meth:`CounterfactualPipeline.run_to_dir` (never overwriting an input; each file written atomically, and
nothing written until everything has been computed):

- 3D inputs: ``counterfactual.nii.gz`` and ``difference.nii.gz`` in the input's affine and shape (native: its dtype);
- 2D inputs (PNG/JPEG/DICOM radiographs): ``counterfactual.png`` and ``difference.png`` (plus ``.nii.gz`` copies);
- ``uncertainty.nii.gz`` with ``samples`` > 1;
- ``figure.png`` (input / counterfactual / difference [/ uncertainty]) and ``record.json`` (what was done).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .composition import STORED_DTYPE_KEY, _on_grid, compose_in_input_space, load_mask, load_native, mask_summary
from .conditioning import ConditionError
from .inferers import LatentDriftInferer, make_inferer, mask_to_image
from .networks.model import ConditionalLDM
from .outputs import as_2d, display_volume, figure_title, png_bits, write_figure, write_native_png, write_png
from .settings import EditSettings
from .transforms.chains import build_chain
from .utils import atomic_write

__all__ = ["CounterfactualPipeline", "EditSettings", "build_chain", "parse_attribute_args"]

_png_bits, _write_png = png_bits, write_png  # old private names (tests, scripts)


def parse_attribute_args(pairs: list[str] | None) -> dict[str, str]:
    """``["age=85", "diagnosis=AD"]`` -> ``{"age": "85", "diagnosis": "AD"}`` (values validated later by the encoder)."""
    out: dict[str, str] = {}
    for p in pairs or []:
        name, sep, value = p.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConditionError(f"attribute arguments look like NAME=VALUE (e.g. age=85), got {p!r}")
        out[name.strip()] = value.strip()
    return out


class CounterfactualPipeline:
    """A trained :class:`ConditionalLDM` with its inferer, preprocessing and default edit settings.

    Built from its parts by a bundle's ``configs/inference.json`` (each one a component a user can override), or in
    one call by :meth:`from_checkpoint`.

    Args:
        model: the model.
        defaults: edit settings overriding ``settings`` (old names accepted, see :class:`EditSettings`).
        device: torch device.
        inferer: the :class:`LatentDriftInferer` (its scheduler; each edit runs on a copy with the plan's steps and
            δ); default: :func:`make_inferer` of the model.
        preprocessing: the preprocessing transform, or its chain dict ``{"chain": "brain_mri"|"chest_xray",
            ...kwargs}``; default: the model's ``meta["preprocessing"]``.
        settings: the default :class:`EditSettings` (or a mapping); default: the model's ``meta["defaults"]``.
        checkpoint: the model's file (the bundle's attribute predictor lies beside it).
    """

    def __init__(self, model: ConditionalLDM, defaults: Mapping[str, Any] | None = None, device: str = "cpu",
                 inferer: LatentDriftInferer | None = None, preprocessing: Any = None,
                 settings: EditSettings | Mapping[str, Any] | None = None,
                 checkpoint: str | os.PathLike | None = None):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.inferer = inferer
        base = model.meta.get("defaults", {}) if settings is None else settings
        self.settings = EditSettings.from_mapping(defaults, base)
        prep = dict(model.meta.get("preprocessing", {}) if preprocessing is None or callable(preprocessing)
                    else preprocessing)
        self.chain_name = prep.pop("chain", "brain_mri" if model.spatial_dims == 3 else "chest_xray")
        self.chain_kwargs = prep
        self.preprocessing = preprocessing if callable(preprocessing) else None
        self.checkpoint = None if checkpoint is None else Path(checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", tile_threshold: float | None = None,
                        **defaults: Any) -> CounterfactualPipeline:
        """``tile_threshold``: image voxels per item above which the autoencoder runs in overlapping windows of its
        training patch (bounded memory; default :data:`~monai_ld.networks.tiling.DEFAULT_TILE_THRESHOLD`, 0 = always,
        ``math.inf`` = never; see :mod:`monai_ld.networks.tiling`)."""
        return cls(cls.load_model(path, device, tile_threshold), defaults, device, checkpoint=path)

    @staticmethod
    def load_model(path: str | os.PathLike, device: str = "cpu", tile_threshold: float | None = None) -> ConditionalLDM:
        """The checkpoint's model (``weights_only``), its autoencoder tiled (see :meth:`from_checkpoint`)."""
        from .networks.tiling import tile_autoencoder

        model = ConditionalLDM.load(path, map_location=device)
        tile_autoencoder(model, path, tile_threshold)
        return model

    @property
    def defaults(self) -> dict[str, Any]:
        return self.settings.asdict()

    @property
    def scheduler_name(self) -> str:
        if self.inferer is not None:
            return type(self.inferer.scheduler).__name__
        return f"{self.model.scheduler_config.get('name', 'DDIM')}Scheduler"

    @property
    def encoder(self):
        return self.model.encoder

    def transform(self):
        """A fresh preprocessing chain per input (requests run concurrently)."""
        if self.preprocessing is not None:
            return copy.deepcopy(self.preprocessing)
        return build_chain({"chain": self.chain_name, **self.chain_kwargs})

    # -- settings ---------------------------------------------------------------------------------------------------
    def resolve(self, target: Mapping[str, Any], source: Mapping[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
        """Validate attributes and settings (:class:`EditSettings` names or their old aliases); returns the plan:
        ``EditSettings.asdict()`` plus ``source`` and ``target`` (clear :class:`ConditionError`/ValueError if bad)."""
        edit = self.settings.update(settings)
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
        n_train = int(self.model.scheduler_config.get("num_train_timesteps", 1000))
        if edit.num_inference_steps > n_train:
            raise ValueError(f"num_inference_steps must be in [1, {n_train}] (the model's training timesteps), "
                             f"got {edit.num_inference_steps}")
        return {**edit.asdict(), "source": src, "target": tgt}

    # -- the edit ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, image: torch.Tensor, plan: Mapping[str, Any], rows: list[Mapping[str, Any]] | None = None):
        """Counterfactual of preprocessed images ``(B, C, *spatial)`` under a resolved ``plan``.

        With ``plan["samples"]`` N > 1 a single image ``(1, C, *spatial)`` is edited N times in one batch, sample
        ``i`` drawing its noise from seed ``seed + i``. ``rows``: one resolved plan per batch item (different inputs
        with their own source/target, same settings); each item draws from its own generator seeded ``seed``, as if
        run alone. Every draw comes from these generators (never torch's global RNG), so concurrent edits with the same
        seed agree.
        """
        steps = plan["num_inference_steps"]
        inferer = make_inferer(self.model, steps) if self.inferer is None else self.inferer.with_steps(steps)
        n = int(plan.get("samples", 1))
        seeded = lambda seed: torch.Generator(device=self.device).manual_seed(seed)  # noqa: E731
        generator: torch.Generator | list[torch.Generator] = seeded(plan["seed"])
        if n > 1:
            if image.shape[0] != 1 or rows:
                raise ValueError(f"samples > 1 edit one image at a time, got a batch of {image.shape[0]}")
            image = image.expand(n, *image.shape[1:])
            generator, rows = [seeded(plan["seed"] + i) for i in range(n)], [plan] * n
        elif rows:
            if len(rows) != image.shape[0]:
                raise ValueError(f"{len(rows)} row plans for a batch of {image.shape[0]}")
            generator = [seeded(plan["seed"]) for _ in rows]
        else:
            rows = [plan] * image.shape[0]
        target = self.model.condition([r["target"] for r in rows])
        source = None
        if any(r.get("source") for r in rows):  # a row without a source abducts under the null condition
            source = torch.cat([self.model.condition([r["source"]]) if r.get("source") else
                                torch.full_like(target[:1], -1.0) for r in rows])
        return inferer.counterfactual(
            image.to(self.device), self.model.autoencoder, self.model.unet, source, target,
            strength=plan["strength"], guidance_scale=plan["guidance_scale"], drift=plan["drift"], mode=self.model.mode,
            composition=plan.get("composition", "none"), abduction=plan.get("abduction", "inversion"),
            mask_threshold=plan.get("mask_threshold"), generator=generator,
        )

    def prepare(self, input_path: str | os.PathLike, plan: Mapping[str, Any], edit_mask: str | os.PathLike | None = None,
                keep_mask: str | os.PathLike | None = None) -> dict[str, Any]:
        """Read and preprocess one input (and its masks) for a resolved ``plan``: everything :meth:`finish` needs."""
        path = Path(input_path)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        native_space = plan["output_space"] == "native"
        if not native_space and (edit_mask is not None or keep_mask is not None):
            raise ValueError("edit and keep masks apply to the native output space (output_space='native'); the model "
                             "output space resamples the whole model output")
        t0 = time.perf_counter()
        native = load_native(path) if native_space else None
        # masks are read before the edit: a mask on another grid is one error, and nothing is computed or written
        edit = load_mask(edit_mask, native, "edit") if edit_mask is not None else None
        keep = load_mask(keep_mask, native, "keep") if keep_mask is not None else None
        transform = self.transform()
        data = transform({"image": str(path)})
        return {"path": path, "native": native, "edit": edit, "keep": keep, "edit_mask": edit_mask,
                "keep_mask": keep_mask, "transform": transform, "data": data, "t0": t0}

    def __call__(self, input_path: str | os.PathLike, target: Mapping[str, Any], source: Mapping[str, Any] | None = None,
                 edit_mask: str | os.PathLike | None = None, keep_mask: str | os.PathLike | None = None,
                 **settings: Any) -> dict[str, Any]:
        """Counterfactual of the file ``input_path``; returns tensors in the input's space plus the record.

        ``edit_mask`` / ``keep_mask``: label images on the input's grid (nonzero = in): change only inside the edit
        mask, never inside the keep mask (native output space only).
        """
        plan = self.resolve(target, source, **settings)
        prep = self.prepare(input_path, plan, edit_mask, keep_mask)
        out = self.edit(prep["data"]["image"].unsqueeze(0).float(), plan)
        return self.finish(prep, plan, out, slice(0, plan["samples"]))

    def finish(self, prep: Mapping[str, Any], plan: Mapping[str, Any], out: Any, rows: slice) -> dict[str, Any]:
        """Results of one input from the batch items ``rows`` of the edit ``out`` (its N samples)."""
        from .transforms import restore_to_input_space

        data, transform, native = prep["data"], prep["transform"], prep["native"]
        x = data["image"]
        n = plan["samples"]
        change = (out.change if out.change is not None else out.difference)[rows].cpu()
        weight = mask_to_image(out.latents["mask"][rows], x.shape[1:]).cpu() if "mask" in out.latents else None
        image = out.image[rows].float().cpu()
        model_cf = image.mean(0)
        model_std = image.std(0) if n > 1 else None
        if native is not None:
            res = compose_in_input_space(change, data, transform, native, weight, prep["edit"], prep["keep"])
            cf_in, diff_in, unc_in, region = res["counterfactual"], res["difference"], res["uncertainty"], res["region"]
            changed = int((cf_in.as_tensor() != native.as_tensor()).sum())
            intensity = (f"the input's own units and dtype ({native.meta[STORED_DTYPE_KEY]}): input + Δ, Δ = the "
                         f"model's change × {res['scale']:.6g} input units per model unit, restricted to the edit region; "
                         "every other voxel is the input's own")
        else:
            cf_in = restore_to_input_space(model_cf, data, transform)
            diff_in = restore_to_input_space(out.difference[rows].float().mean(0).cpu(), data, transform)
            unc_in = restore_to_input_space(model_std, data, transform) if model_std is not None else None
            region, changed = None, None
            intensity = "model scale [0, 1] after percentile normalisation (not the input's raw intensities)"
        record = {
            "input": str(prep["path"].resolve()),
            "model": {"spatial_dims": self.model.spatial_dims, "attributes": self.encoder.to_config(),
                      "preprocessing": {"chain": self.chain_name, **self.chain_kwargs}},
            "source": plan["source"], "source_mode": "given" if plan["source"] else "null (unconditional abduction)",
            "target": plan["target"],
            **{k: plan[k] for k in EditSettings.keys()}, "denoising_steps": out.settings["steps"],
            "scheduler": self.scheduler_name, "seeds": [plan["seed"] + i for i in range(n)],
            "intensity": intensity,
            "region": mask_summary(region, prep["edit_mask"], prep["keep_mask"], plan["mask_threshold"])
            if native is not None else None,
            "changed_voxels": changed,
            "seconds": round(time.perf_counter() - prep["t0"], 2),
        }
        return {"counterfactual": cf_in, "difference": diff_in, "uncertainty": unc_in, "region": region,
                "input": native if native is not None else restore_to_input_space(x, data, transform),
                "model_space": {"input": x, "counterfactual": model_cf, "uncertainty": model_std},
                "record": record, "reference": data["image"]}

    # -- writing ----------------------------------------------------------------------------------------------------
    def output_paths(self, input_path: str | os.PathLike, output_dir: str | os.PathLike, plan: Mapping[str, Any],
                     overwrite: bool = False, edit_mask: Any = None, keep_mask: Any = None) -> dict[str, Path]:
        """The files :meth:`write` will write; raises if one is an input or exists (without ``overwrite``)."""
        out_dir = Path(output_dir)
        inputs = [Path(p).resolve() for p in (input_path, edit_mask, keep_mask) if p is not None]
        names = {"counterfactual": "counterfactual.nii.gz", "difference": "difference.nii.gz", "figure": "figure.png",
                 "record": "record.json"}
        if plan["samples"] > 1:
            names["uncertainty"] = "uncertainty.nii.gz"
        if self.model.spatial_dims == 2:
            names.update(counterfactual_png="counterfactual.png", difference_png="difference.png")
        targets = {k: out_dir / v for k, v in names.items()}
        for p in targets.values():
            if p.resolve() in inputs:
                raise ValueError(f"refusing to write {p}: it is an input file")
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p} exists; choose another --output-dir or pass overwrite")
        return targets

    def write(self, result: Mapping[str, Any], targets: Mapping[str, Path], input_path: str | os.PathLike,
              overwrite: bool = False) -> dict[str, str]:
        """Write a computed ``result`` to ``targets`` (:meth:`output_paths`); ``record.json`` last (= finished)."""
        from .transforms import save_like_input

        targets["record"].parent.mkdir(parents=True, exist_ok=True)
        ref, cf, native = result["reference"], result["counterfactual"], result["record"]["output_space"] == "native"
        dtype = np.dtype(cf.meta[STORED_DTYPE_KEY]) if native else np.float32
        save_like_input(cf, targets["counterfactual"], reference=ref, overwrite=overwrite, dtype=dtype)
        save_like_input(result["difference"], targets["difference"], reference=ref, overwrite=overwrite)
        if result["uncertainty"] is not None:
            save_like_input(result["uncertainty"], targets["uncertainty"], reference=ref, overwrite=overwrite)
        if self.model.spatial_dims == 2:
            if native:
                write_native_png(cf, targets["counterfactual_png"], cf.meta[STORED_DTYPE_KEY])
            else:
                write_png(as_2d(cf), targets["counterfactual_png"], (0.0, 1.0), png_bits(Path(input_path)))
            write_png(as_2d(result["difference"]), targets["difference_png"], None)
        _figure(result, targets["figure"], self.model.spatial_dims)
        record = {**result["record"], "outputs": {k: str(v) for k, v in targets.items()}}
        atomic_write(targets["record"], lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        return {k: str(v) for k, v in targets.items()}

    def run_to_dir(self, input_path: str | os.PathLike, output_dir: str | os.PathLike, target: Mapping[str, Any],
                   source: Mapping[str, Any] | None = None, overwrite: bool = False,
                   edit_mask: str | os.PathLike | None = None, keep_mask: str | os.PathLike | None = None,
                   estimate_source: bool = False, **settings: Any) -> dict[str, str]:
        """Compute the counterfactual of ``input_path`` and write the outputs into ``output_dir``; returns their paths.

        ``estimate_source``: the attributes ``source`` leaves out are estimated by the bundle's attribute predictor
        (:func:`monai_ld.estimate.estimate_source`; recorded with their confidence)."""
        estimate = None
        if estimate_source:
            from .estimate import estimate_source as _estimate

            if not Path(input_path).exists():
                raise FileNotFoundError(f"input not found: {input_path}")
            source, estimate = _estimate(self, input_path, source)
        plan = self.resolve(target, source, **settings)  # bad settings fail before anything is read
        targets = self.output_paths(input_path, output_dir, plan, overwrite, edit_mask, keep_mask)
        result = self(input_path, target, source, edit_mask=edit_mask, keep_mask=keep_mask, **settings)
        if estimate is not None:
            result["record"].update(source_mode=f"estimated by the attribute predictor (given: {estimate['given'] or 'none'})",
                                    source_estimate=estimate)
        return self.write(result, targets, input_path, overwrite)  # everything computed before anything is written


def _figure(result: Mapping[str, Any], path: Path, spatial_dims: int) -> None:
    """input / counterfactual / difference [/ uncertainty]: in the input's own space and units for native outputs
    (edit region outlined), on the model's grid and scale otherwise."""
    rec = result["record"]
    if rec["output_space"] == "native":
        view = display_volume if spatial_dims == 3 else (lambda t: np.asarray(t[0].float().cpu().numpy(), np.float32))
        x, cf, d = view(result["input"]), view(result["counterfactual"]), view(result["difference"])
        unc = None if result["uncertainty"] is None else view(result["uncertainty"])
        region = None if result["region"] is None else view(result["region"].float() if spatial_dims == 2 else
                                                           _on_grid(result["region"].float(), result["input"])) > 0.5
        lo, hi = (float(v) for v in np.percentile(x[:: max(1, x.shape[0] // 64)], (0.5, 99.5)))
        unit = "input units"
    else:
        ms = result["model_space"]
        x, cf = (np.asarray(ms[k][0].cpu(), dtype=np.float32) for k in ("input", "counterfactual"))
        d, region, (lo, hi), unit = cf - x, None, (0.0, 1.0), "model scale"
        unc = None if ms["uncertainty"] is None else np.asarray(ms["uncertainty"][0], dtype=np.float32)
    m = float(np.abs(d).max()) or 1.0
    panels = [("input", x, "gray", lo, hi), ("counterfactual", cf, "gray", lo, hi),
              (f"difference (cf - input, {unit})", d, "RdBu_r", -m, m)]
    if unc is not None:
        panels.append((f"uncertainty (std of {rec['samples']} samples)", unc, "magma", 0.0, float(unc.max()) or 1.0))
    write_figure(path, panels, spatial_dims, figure_title(rec), region)
