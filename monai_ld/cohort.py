"""Cohort mode: one counterfactual per row of a CSV (or per image in a folder), resumable, one error per bad row.

``monai-ld counterfactual --input-list list.csv --target diagnosis=AD --output-dir out/``

The CSV has a ``path`` column (absolute, or relative to the CSV), optionally columns named as the model's attributes
(each row's own source; an empty cell = not given; ``--source`` values fill what a row leaves out) and ``edit_mask`` /
``keep_mask`` columns (label images on that row's grid). A folder instead of a CSV: every image file in it, no sources.

Each row is written to ``out/<id>/`` (``<id>`` from the file name) by
:meth:`~monai_ld.pipeline.CounterfactualPipeline.run_to_dir`, which writes ``record.json`` last: a row whose folder
holds a ``record.json`` is finished and skipped on a re-run. A bad row (unreadable file, out-of-range attribute, mask
on another grid) is one line on stderr and a ``failed`` row in ``out/summary.csv``; the others run. Rows are edited
``batch_size`` at a time in one model batch (each with its own source and the seed it would have alone); reading,
composing and writing stay per row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .utils import atomic_write

__all__ = ["read_input_list", "run_cohort", "SUMMARY_FIELDS"]

SUMMARY_FIELDS = ("row", "id", "path", "status", "seconds", "changed_voxels", "output_dir", "error")
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".bmp", ".dcm")
_MASK_COLUMNS = ("edit_mask", "keep_mask")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def read_input_list(source: str | os.PathLike, attribute_names: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """Rows ``{"row", "id", "path", "source", "edit_mask", "keep_mask"}`` of a CSV or a folder (see module docstring).

    Raises:
        ValueError: no ``path`` column, or nothing to run (the only errors that stop the whole cohort).
        FileNotFoundError: ``source`` does not exist.
    """
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"input list not found: {src}")
    rows: list[dict[str, Any]] = []
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES))
        rows = [{"row": i + 1, "path": p, "source": {}, "edit_mask": None, "keep_mask": None} for i, p in enumerate(files)]
    else:
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{src}: a CSV input list needs a 'path' column (found: {', '.join(reader.fieldnames or [])})")
            for i, r in enumerate(reader):
                def resolve(v: str | None) -> Path | None:
                    if not v or not v.strip():
                        return None
                    p = Path(v.strip())
                    return p if p.is_absolute() else src.parent / p

                rows.append({"row": i + 1, "path": resolve(r["path"]) or Path(""),
                             "source": {n: r[n].strip() for n in attribute_names if (r.get(n) or "").strip()},
                             **{k: resolve(r.get(k)) for k in _MASK_COLUMNS}})
    if not rows:
        raise ValueError(f"{src}: no inputs to run (a CSV with a 'path' column, or a folder of images)")
    seen: dict[str, int] = {}
    for r in rows:  # a unique output folder per row, readable: the file name, numbered when repeated
        stem = _stem(r["path"]) or f"row{r['row']}"
        seen[stem] = seen.get(stem, 0) + 1
        r["id"] = stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"
    return rows


def _write_summary(path: Path, results: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    w.writeheader()
    for r in results:
        w.writerow({k: r.get(k, "") for k in SUMMARY_FIELDS})
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


def _error(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _edit_batch(pipe: Any, ready: list[tuple]) -> list[tuple[Any, slice]]:
    """One edit for the prepared rows when they share the model grid (else, or with samples > 1, one per row)."""
    plan = ready[0][1]
    images = [prep["data"]["image"] for _, _, _, prep in ready]
    if plan["samples"] > 1 or len(ready) == 1 or len({tuple(x.shape) for x in images}) > 1:
        return [(pipe.edit(x.unsqueeze(0).float(), p), slice(0, p["samples"])) for x, (_, p, _, _) in zip(images, ready)]
    out = pipe.edit(torch.stack([x.as_tensor() if hasattr(x, "as_tensor") else x for x in images]).float(), plan,
                    rows=[p for _, p, _, _ in ready])
    return [(out, slice(j, j + 1)) for j in range(len(ready))]


def run_cohort(pipe: Any, input_list: str | os.PathLike, output_dir: str | os.PathLike, target: Mapping[str, Any],
               source: Mapping[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
               batch_size: int = 4, estimate_source: bool = False, **settings: Any) -> tuple[list[dict[str, Any]], int]:
    """Run every row, ``batch_size`` inputs per model batch; returns the summary rows (input order) and the number of
    failed rows (``summary.csv`` is rewritten after each batch).

    ``source`` fills attributes a row leaves out; ``estimate_source``: the attribute predictor estimates what both
    leave out (:func:`monai_ld.estimate.estimate_source`); ``overwrite`` recomputes finished rows too.
    """
    from .estimate import estimate_source as _estimate
    from .conditioning import ConditionError

    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rows = read_input_list(input_list, pipe.encoder.names)
    try:  # bad settings: one error before any row; attributes are checked per row (a row may give its own source)
        pipe.resolve(target, dict(source) if source else None, **settings)
    except ConditionError:
        pass
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="counterfactuals", unit="image", file=sys.stderr)

    def report(r: dict[str, Any], res: dict[str, Any]) -> None:
        results[r["row"]] = {"row": r["row"], "id": r["id"], "path": str(r["path"]), "output_dir": str(out / r["id"]), **res}
        if res["status"] == "failed":
            results[r["row"]]["output_dir"] = ""
            line = f"row {r['row']} ({r['path']}): error: {res['error']}"
            if bar is not None:
                bar.write(line, file=sys.stderr)  # above the progress bar, not through it
            else:
                print(line, file=sys.stderr)
        if bar is not None:
            bar.update(1)

    pending = []
    for r in rows:  # a folder with record.json is a finished row; without, an unfinished one whose files are replaced
        if (out / r["id"] / "record.json").is_file() and not overwrite:
            report(r, {"status": "skipped (done)"})
        else:
            pending.append(r)
    for i in range(0, len(pending), int(batch_size)):
        t0 = time.perf_counter()
        ready = []
        for r in pending[i : i + int(batch_size)]:
            try:
                src, est = {**(source or {}), **r["source"]}, None
                if estimate_source:
                    src, est = _estimate(pipe, r["path"], src)
                plan = pipe.resolve(target, src or None, **settings)
                paths = pipe.output_paths(r["path"], out / r["id"], plan, True, r["edit_mask"], r["keep_mask"])
                prep = pipe.prepare(r["path"], plan, r["edit_mask"], r["keep_mask"])
                ready.append((r, {**plan, "source_estimate": est}, paths, prep))
            except Exception as e:  # noqa: BLE001 - one bad row must not stop the cohort; its error is reported
                report(r, {"status": "failed", "error": _error(e)})
        try:
            edits = _edit_batch(pipe, ready) if ready else []
        except Exception as e:  # noqa: BLE001
            edits = []
            for r, *_ in ready:
                report(r, {"status": "failed", "error": _error(e)})
        for (r, plan, paths, prep), (edit_out, sl) in zip(ready, edits):
            try:
                result = pipe.finish(prep, plan, edit_out, sl)
                if plan["source_estimate"] is not None:
                    result["record"].update(source_mode="estimated by the attribute predictor",
                                            source_estimate=plan["source_estimate"])
                written = pipe.write(result, paths, r["path"], overwrite=True)
                changed = json.loads(Path(written["record"]).read_text()).get("changed_voxels")
                report(r, {"status": "done", "changed_voxels": changed,
                           "seconds": round((time.perf_counter() - t0) / len(ready), 2)})
            except Exception as e:  # noqa: BLE001
                report(r, {"status": "failed", "error": _error(e)})
        _write_summary(out / "summary.csv", [results[k] for k in sorted(results)])
    if bar is not None:
        bar.close()
    _write_summary(out / "summary.csv", [results[k] for k in sorted(results)])
    summary = [results[k] for k in sorted(results)]
    return summary, sum(r["status"] == "failed" for r in summary)
