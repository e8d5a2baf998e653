"""A MONAI Label ``InferTask`` that serves a counterfactual model: image id + target attributes -> NIfTI.

The task does not go through MONAI Label's transform-based ``BasicInferTask``: the
:class:`~monai_ld.pipeline.CounterfactualPipeline` (the ``pipeline`` component of the bundle's inference config,
:func:`monai_ld.bundle_support.load_pipeline`) already reads the file, preprocesses, edits, and restores the result
to the input's geometry (same shape and affine). The task

1. parses and validates the request (:func:`monai_ld.label.params.parse_params` then
   :meth:`~monai_ld.pipeline.CounterfactualPipeline.resolve`); a bad request raises :class:`RequestError` (-> 4xx);
2. runs :meth:`~monai_ld.pipeline.CounterfactualPipeline.run_to_dir` into
   ``<outputs>/<image id>/<model>/<key>/`` (``counterfactual.nii.gz``, ``difference.nii.gz``, ``figure.png``,
   ``record.json``), where ``key`` hashes the input file, the checkpoint and the resolved settings: the same
   request again (e.g. asking for the difference after the counterfactual) is served from there without recomputing;
3. returns a temporary copy of the requested volume (MONAI Label deletes the file it sends) and a JSON result that
   lists where all outputs are.

A label sent with the request (3D Slicer's segment, uploaded as MONAI Label's ``label`` file; nonzero = in) is the
edit mask: the counterfactual changes only there (native output space; its content is part of the cache key).

Requests run concurrently: every random draw of an edit comes from its own generators (seeded by the request's
``seed``), so the same request gives the same output however many run at once. Only two requests for the same run
folder wait for each other (a lock per folder): the second is then served from the first one's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..bundle_support import load_pipeline
from .params import SETTING_KEYS, RequestError, parse_params, slicer_config

__all__ = ["CounterfactualInferTask", "run_dir_lock"]

logger = logging.getLogger(__name__)

_guard = threading.Lock()
_run_locks: dict[Path, list] = {}  # run folder -> [its lock, requests holding or waiting for it]


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (one per folder, dropped when no request wants it): two requests never write the
    same files at once, while requests for different folders do not wait for each other."""
    key = Path(run_dir).resolve()
    with _guard:
        entry = _run_locks.setdefault(key, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _run_locks[key]


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class CounterfactualInferTask(InferTask):
    """Counterfactual of a datastore image under target attributes.

    Args:
        name: the model name (the bundle's name).
        checkpoint: ``models/model.pt`` of the bundle.
        outputs_dir: where every run's files are written (see the module docstring).
        device: torch device for the model.
    """

    def __init__(self, name: str, checkpoint: str | os.PathLike, outputs_dir: str | os.PathLike, device: str = "cpu"):
        self.name = name
        self.checkpoint = Path(checkpoint)
        self.outputs_dir = Path(outputs_dir)
        # the bundle's inference components (configs/common.json + inference.json), as `monai.bundle run` builds them
        self.pipeline = load_pipeline(self.checkpoint, device=device)
        enc = self.pipeline.encoder
        dims = self.pipeline.model.spatial_dims
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=dims,
            description=(f"Latent Drifting counterfactual ({dims}D, {self.pipeline.chain_name}): the image as it would "
                         f"look under target attributes ({enc.describe()}). Returns a NIfTI in the input's geometry; "
                         f"params 'result': 'difference' returns counterfactual - input instead; a label sent with the request "
                         f"is the edit mask (change only there)."),
            config=slicer_config(enc, self.pipeline.defaults),
        )

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["attributes"] = self.pipeline.encoder.to_config()
        info["defaults"] = _jsonable(self.pipeline.defaults)
        info["outputs"] = ["counterfactual", "difference", "uncertainty"]
        return info

    def is_valid(self) -> bool:
        return self.checkpoint.is_file()

    def get_path(self, validate=True):
        return str(self.checkpoint)

    # -- request -> plan --------------------------------------------------------------------------------------------
    def parse(self, request: dict[str, Any]):
        """Validated ``(CounterfactualRequest, plan)`` or :class:`RequestError` (422) with the reason."""
        req = parse_params(request, self.pipeline.encoder.names)
        try:
            plan = self.pipeline.resolve(req.target, req.source or None, **req.settings)
        except (ValueError, TypeError) as e:  # ConditionError is a ValueError
            raise RequestError(str(e)) from None
        return req, plan

    def _run_dir(self, image_id: str, image_path: Path, plan: dict[str, Any], label: Path | None = None) -> Path:
        st = image_path.stat()
        ck = self.checkpoint.stat()
        key = json.dumps({"image": str(image_path.resolve()), "mtime": st.st_mtime_ns, "size": st.st_size,
                          "checkpoint": str(self.checkpoint.resolve()), "ck_mtime": ck.st_mtime_ns, "ck_size": ck.st_size,
                          "plan": _jsonable(plan),
                          "label": hashlib.sha256(label.read_bytes()).hexdigest() if label else None}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id) or "image"
        return self.outputs_dir / safe_id / self.name / digest

    # -- MONAI Label entry point ------------------------------------------------------------------------------------
    def __call__(self, request: dict[str, Any]):
        t0 = time.perf_counter()
        req, plan = self.parse(request)
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise RequestError("no image given (query ?image=<id> or upload a file)", status=400)
        image_path = Path(image)
        if not image_path.exists():
            raise RequestError(f"image not found: {image}", status=404)
        image_id = str(request.get("image_id") or image_path.name.split(".")[0])
        label = request.get("label")  # MONAI Label stores an uploaded label as a temporary file and passes its path
        label = Path(label) if isinstance(label, str) and label and Path(label).is_file() else None
        if req.result == "uncertainty" and plan["samples"] < 2:
            raise RequestError("result 'uncertainty' needs samples > 1 (the standard deviation over the samples)")
        run_dir = self._run_dir(image_id, image_path, plan, label)
        settings = {k: plan[k] for k in SETTING_KEYS}
        waited = time.perf_counter()
        with run_dir_lock(run_dir):
            waited = time.perf_counter() - waited
            record_file = run_dir / "record.json"
            cached = record_file.is_file()
            if not cached:
                run_dir.mkdir(parents=True, exist_ok=True)
                try:
                    # no source in the request: the bundle's attribute predictor estimates it (when it has one)
                    auto = not req.source and (self.checkpoint.parent / "oracle.pt").is_file()
                    self.pipeline.run_to_dir(image_path, run_dir, req.target, req.source or None, overwrite=True,
                                             edit_mask=label, estimate_source=auto, **settings)
                except (ValueError, FileNotFoundError) as e:  # e.g. a 2D image sent to a 3D model
                    raise RequestError(f"cannot make a counterfactual of {image_id!r} with {self.name}: {e}") from None
        record = json.loads(record_file.read_text())
        outputs = {k: str(run_dir / n) for k, n in (("counterfactual", "counterfactual.nii.gz"),
                                                    ("difference", "difference.nii.gz"), ("figure", "figure.png"),
                                                    ("record", "record.json"), ("uncertainty", "uncertainty.nii.gz"))
                   if (run_dir / n).is_file()}
        # MONAI Label deletes the file it answers with: hand it a copy, keep the run folder
        fd, response_file = tempfile.mkstemp(prefix=f"{image_id}_{req.result}_", suffix=".nii.gz")
        os.close(fd)
        shutil.copyfile(outputs[req.result], response_file)
        result = {
            "model": self.name,
            "image": image_id,
            "result": req.result,
            "outputs": outputs,
            "cached": cached,
            "target": record.get("target"),
            "source": record.get("source"),
            "settings": settings,
            "record": record,
            "latencies": {"wait_for_same_request": round(waited, 3), "total": round(time.perf_counter() - t0, 3)},
        }
        return response_file, result
