"""What every evaluation job starts from: the model under test as a pipeline, its oracle, the real reference set."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bundle_support import load_pipeline as _bundle_pipeline
from ..conditioning import AttributeEncoder
from ..evaluation import AttributeOracle, EvaluationError, load_reference
from ..pipeline import CounterfactualPipeline
from ..settings import EditSettings
from ..utils import log_progress

__all__ = ["Job", "open_job", "load_pipeline", "load_oracle", "edit_settings", "reference_set"]


def load_pipeline(checkpoint: str | os.PathLike, device: str = "cpu") -> CounterfactualPipeline:
    """The :class:`~monai_ld.pipeline.CounterfactualPipeline` of a model checkpoint (clear error when absent): its
    bundle's inference components when it lies in one (:func:`monai_ld.bundle_support.load_pipeline`)."""
    p = Path(checkpoint)
    if not p.is_file():
        raise FileNotFoundError(f"model checkpoint '{p}' does not exist (train the bundle first, or pass the right bundle)")
    return _bundle_pipeline(p, device=device)


def load_oracle(path: str | os.PathLike | None, notes: dict, device: str = "cpu") -> AttributeOracle | None:
    """The oracle at ``path``, or None with the reason in ``notes["oracle"]``."""
    if path is None or str(path) == "":
        notes["oracle"] = "no oracle path given: effectiveness, minimality and fid/kid/mmd are not computed"
        return None
    p = Path(path)
    if not p.is_file():
        notes["oracle"] = (f"oracle file '{p}' does not exist: effectiveness, minimality and fid/kid/mmd are not computed; "
                           f"train it with the bundle's configs/train_oracle.json")
        return None
    return AttributeOracle.load(p, map_location=device)


def edit_settings(settings: Mapping[str, Any] | None) -> dict:
    """The edit settings given, validated, under :class:`~monai_ld.settings.EditSettings` names (``None`` values
    dropped: the model's defaults apply); δ comes through ``drifts``."""
    s = EditSettings.given(settings)
    if "drift" in s:
        raise EvaluationError("give δ through 'drifts', not through the edit settings")
    return s


@dataclass(frozen=True)
class Job:
    """A model under test and its oracle, loaded once and shared by an evaluation and the sweep it runs; the paths
    are what the reports record."""

    pipe: CounterfactualPipeline
    oracle: AttributeOracle | None
    checkpoint: str
    oracle_path: str | None
    progress: bool = True

    @property
    def encoder(self) -> AttributeEncoder:
        return self.pipe.encoder

    @property
    def preprocessing(self) -> dict:
        """The model's preprocessing chain (the evaluation images go through it, as the model's inputs did)."""
        return self.pipe.model.meta.get("preprocessing", {})

    def log(self, msg: str) -> None:
        log_progress(msg, self.progress)


def open_job(checkpoint: str | os.PathLike, oracle: str | os.PathLike | None, notes: dict, device: str = "cpu",
             progress: bool = True) -> Job:
    """Load the model and its oracle (a missing oracle is a note, not an error: see :func:`load_oracle`)."""
    return Job(load_pipeline(checkpoint, device), load_oracle(oracle, notes, device), str(checkpoint),
               None if oracle is None else str(oracle), progress)


def reference_set(job: Job, manifest: str | os.PathLike, split: str, limit: int | None) -> dict | None:
    """Real images of ``split`` with their attribute rows and oracle features (minimality and realism compare with
    them); None without an oracle, which both need."""
    if job.oracle is None:
        return None
    t0 = time.perf_counter()
    images, rows, _ = load_reference(manifest, job.preprocessing, job.encoder, split, limit)
    job.log(f"reference: {images.shape[0]} real images of split {split!r} loaded in {time.perf_counter() - t0:.0f} s")
    return {"images": images, "rows": rows, "features": job.oracle.features(images), "split": split}
