"""What the bundle configs call: locate the bundle, make/read its data, train, and run inference.

Bundles stay thin (configs only, no Python copied into them); every ``_target_`` / ``$expression`` points here,
at :mod:`monai_ld.engines` or at :mod:`monai_ld.pipeline`.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .settings import EditSettings

__all__ = ["bundle_root", "config_files", "ensure_phantoms", "load_pipeline", "load_samples", "run_inference",
           "train_autoencoder", "train_diffusion", "finetune", "device"]


def _config_files_from_argv(argv: Sequence[str]) -> list[str]:
    for i, a in enumerate(argv):
        value = None
        if a == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--config_file="):
            value = a.split("=", 1)[1]
        if value is not None:
            if value.strip().startswith("["):
                try:
                    return [str(v) for v in ast.literal_eval(value)]
                except (ValueError, SyntaxError):
                    pass
            return [v for v in value.split(",") if v]
    return []


def bundle_root(argv: Sequence[str] | None = None) -> str:
    """The bundle folder: the parent of the ``configs/`` folder holding the ``--config_file`` being run
    (so ``python -m monai.bundle run --config_file bundles/x/configs/inference.json`` works from any directory),
    else the current directory when it holds ``configs/metadata.json``. Override with ``--bundle_root``."""
    for cfg in _config_files_from_argv(list(sys.argv if argv is None else argv)):
        p = Path(cfg).resolve().parent
        if p.name == "configs":
            return str(p.parent)
    cwd = Path.cwd()
    if (cwd / "configs" / "metadata.json").is_file():
        return str(cwd)
    raise ValueError("cannot tell the bundle root: run with --config_file <bundle>/configs/<file>.json or pass --bundle_root")


def device(prefer: str = "auto") -> str:
    """``cuda:<LOCAL_RANK>`` when a GPU is there (torchrun sets LOCAL_RANK), else ``cpu``; or exactly ``prefer``."""
    import torch

    if prefer != "auto":
        return prefer
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def ensure_phantoms(data_dir: str, kind: str, n: int, size: int, seed: int = 0,
                    counterfactual_splits: Sequence[str] = ("test",)) -> str:
    """Write the phantom training set into ``data_dir`` unless the same set is already there; returns the manifest.

    Seeded, so re-running a bundle's train config regenerates the very same data. A set written with other settings
    (``dataset.json``: n, size, seed, the splits with ground-truth pairs) is regenerated in place: ``data_dir`` is a
    cache of the generator, never user data.
    """
    from .data.phantoms.writer import write_phantom_dataset

    manifest = Path(data_dir) / "manifest.csv"
    want = {"n_subjects": int(n), "size": int(size), "seed": int(seed), "counterfactual_splits": list(counterfactual_splits)}
    if manifest.is_file() and _phantom_settings(Path(data_dir), want) == want:
        return str(manifest)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes; the others wait for it
        import time

        while not (manifest.is_file() and _phantom_settings(Path(data_dir), want) == want):
            time.sleep(1)
    else:
        write_phantom_dataset(kind, n=int(n), size=int(size), seed=int(seed), out_dir=data_dir,
                              overwrite=manifest.is_file(), counterfactual_splits=tuple(counterfactual_splits))
    return str(manifest)


def _phantom_settings(data_dir: Path, want: Mapping[str, Any]) -> dict:
    try:
        settings = json.loads((data_dir / "dataset.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return {}
    settings.setdefault("counterfactual_splits", ["test"])  # sets written before the option existed
    return {k: settings.get(k) for k in want}


def load_samples(manifest: str, split: str | Sequence[str] | None, preprocessing: Mapping[str, Any],
                 attributes: Sequence[Mapping[str, Any]], limit: int | None = None, factual_only: bool = True) -> list[dict]:
    """Rows of ``manifest`` in ``split`` -> preprocessed ``{"image", "condition"}`` samples (in memory)."""
    import csv

    from .conditioning import AttributeEncoder
    from .engines.training import preprocess
    from .pipeline import build_chain

    enc = AttributeEncoder(attributes)
    root = Path(manifest).parent
    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    items = []
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            if splits is not None and row.get("split") not in splits:
                continue
            if factual_only and row.get("counterfactual_of"):
                continue
            p = Path(row["path"])
            items.append({"image": str(p if p.is_absolute() else root / p), **{k: row[k] for k in enc.names}})
    if limit:
        items = items[: int(limit)]
    if not items:
        raise ValueError(f"no rows of split {split!r} in {manifest}")
    return preprocess(items, build_chain(dict(preprocessing), encoder=enc))


def train_autoencoder(samples: list[dict], output: str, spatial_dims: int, **kwargs: Any) -> str:
    from .engines.training import train_autoencoder as _train

    return str(_train(samples, output, spatial_dims, **kwargs))


def train_diffusion(samples: list[dict], autoencoder: str, output: str, attributes: Sequence[Mapping[str, Any]],
                    preprocessing: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    """Train the diffusion model and record in its checkpoint what inference needs (preprocessing, defaults)."""
    from .engines.training import train_diffusion as _train

    meta = {"preprocessing": dict(preprocessing), "defaults": EditSettings.given(defaults)}
    return str(_train(samples, autoencoder, output, attributes, meta=meta, **kwargs))


def finetune(samples: list[dict], base_model: str, output: str, defaults: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
    from .engines.training import finetune as _finetune
    from .networks.model import ConditionalLDM

    out = _finetune(samples, base_model, output, **kwargs)
    if defaults and int(os.environ.get("RANK", "0")) == 0:
        m = ConditionalLDM.load(out)
        m.meta = {**m.meta, "defaults": EditSettings.given({**EditSettings.given(m.meta.get("defaults")), **defaults})}
        m.save(out)
    return str(out)


COMMON_CONFIG = "common.json"  # what every config of a bundle merges over (paths, device, data, attributes, model)
INFERENCE_CONFIGS = (COMMON_CONFIG, "inference.json")  # what `python -m monai.bundle run` merges for inference


def config_files(bundle: str | os.PathLike, *names: str) -> list[str]:
    """The ``--config_file`` list of a bundle job: ``<bundle>/configs/common.json`` first, then ``names`` (e.g.
    ``train_diffusion.json``, ``multi_gpu_train.json``), as model-zoo bundles merge them; a clear error when a file is
    missing."""
    configs = Path(bundle) / "configs"
    files = [configs / n for n in (COMMON_CONFIG, *names)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"bundle config(s) not found: {', '.join(missing)}")
    return [str(f) for f in files]


def load_pipeline(checkpoint: str | os.PathLike, device: str = "cpu", overrides: Mapping[str, Any] | None = None):
    """The :class:`~monai_ld.pipeline.CounterfactualPipeline` of ``checkpoint``: built from the components of its
    bundle's ``configs/common.json`` + ``configs/inference.json`` (model, scheduler, inferer, preprocessing, settings;
    ``overrides`` as ``{"inferer#drift": 0.1}``) when ``checkpoint`` is ``<bundle>/models/<file>`` of a bundle that has
    them, else :meth:`~monai_ld.pipeline.CounterfactualPipeline.from_checkpoint`."""
    from monai.bundle import ConfigParser

    from .pipeline import CounterfactualPipeline

    checkpoint = Path(checkpoint)
    bundle = checkpoint.resolve().parent.parent
    files = [bundle / "configs" / name for name in INFERENCE_CONFIGS]
    if not all(f.is_file() for f in files):
        return CounterfactualPipeline.from_checkpoint(checkpoint, device=device)
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"bundle_root": str(bundle), "checkpoint": str(checkpoint), "device": device, **dict(overrides or {})})
    return parser.get_parsed_content("pipeline")


def run_inference(pipeline: Any, input: str, output_dir: str, target: Any, source: Any = None, overwrite: bool = False,
                  edit_mask: str | None = None, keep_mask: str | None = None) -> dict[str, str]:
    """The bundle's inference: ``pipeline``'s counterfactual of ``input`` written into ``output_dir`` (settings: the
    pipeline's, i.e. the config's ``settings`` component); prints where things went.

    ``target``/``source`` are dicts (or JSON / Python-literal strings of dicts, as a shell passes them).
    """
    target, source = _as_mapping(target, "target"), _as_mapping(source, "source")
    outputs = pipeline.run_to_dir(input, output_dir, target=target, source=source, overwrite=bool(overwrite),
                                  edit_mask=edit_mask, keep_mask=keep_mask)
    print(json.dumps(outputs, indent=2))
    return outputs


def _as_mapping(value: Any, name: str) -> dict | None:
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, Mapping):
                return dict(parsed)
    raise ValueError(f"{name} must be a mapping like {{'age': 85, 'diagnosis': 'AD'}}, got {value!r}")
