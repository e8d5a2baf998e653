"""Evaluation data: the rows of a phantom-style manifest, preprocessed for the model under test.

- :func:`load_counterfactual_pairs` — the rows of a split that have a ground-truth counterfactual partner
  (``counterfactual_of`` = the factual's ``image_id``), preprocessed TOGETHER (the factual drives the foreground crop,
  so both images share one grid); :func:`load_reference` — real images + attribute rows of a split.
- :func:`intervention_targets` — seeded single-attribute interventions, for splits without ground-truth pairs.
- :func:`make_batches` / :func:`add_latent_oracle` — batches for :class:`~.evaluator.CounterfactualEvaluator`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..conditioning import AttributeEncoder, CategoricalAttribute, ContinuousAttribute
from ..transforms.chains import build_chain
from ._checks import EvaluationError

__all__ = [
    "MANIFEST_PAIR_COLUMNS",
    "read_manifest",
    "manifest_path",
    "intervened_attributes",
    "load_counterfactual_pairs",
    "load_reference",
    "intervention_targets",
    "make_batches",
    "add_latent_oracle",
]

MANIFEST_PAIR_COLUMNS = ("image_id", "path", "split", "counterfactual_of")


def read_manifest(manifest: str | Path, encoder: AttributeEncoder, required: Sequence[str] = MANIFEST_PAIR_COLUMNS) -> list[dict]:
    """Rows of a CSV manifest as string dicts; checks the columns the evaluation needs (clear error naming them)."""
    p = Path(manifest)
    if not p.is_file():
        raise FileNotFoundError(f"manifest '{p}' does not exist")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [dict(r) for r in reader]
    need = list(required) + [n for n in encoder.names if n not in required]
    missing = [c for c in need if c not in columns]
    if missing:
        raise EvaluationError(
            f"manifest '{p}' lacks column(s) {', '.join(missing)}; an evaluation manifest needs {', '.join(need)} "
            f"(phantom manifests from `monai-ld phantoms` have them; ground-truth pairs are rows whose "
            f"'counterfactual_of' names a factual image_id)")
    for r in rows:
        r["image_id"] = str(r["image_id"])
        r["_root"] = str(p.parent)
    return rows


def manifest_path(row: Mapping) -> str:
    """The row's ``path``, relative paths taken from the manifest's folder."""
    q = Path(row["path"])
    return str(q if q.is_absolute() else Path(row["_root"]) / q)


def _row_attrs(row: Mapping, encoder: AttributeEncoder, where: str) -> dict:
    try:
        return encoder.validate({n: row[n] for n in encoder.names})
    except ValueError as e:
        raise EvaluationError(f"{where}: {e}") from None


def intervened_attributes(source: Mapping, target: Mapping, encoder: AttributeEncoder) -> list[str]:
    """Names of the attributes whose value differs between two (validated) rows."""
    out = []
    for a in encoder.attributes:
        s, t = source[a.name], target[a.name]
        if isinstance(a, ContinuousAttribute):
            if abs(float(s) - float(t)) > 1e-6:
                out.append(a.name)
        elif a.validate(s) != a.validate(t):
            out.append(a.name)
    return out


def _build_chain(preprocessing: Mapping, keys: Sequence[str]):
    return build_chain({**dict(preprocessing), "keys": tuple(keys)})


def load_counterfactual_pairs(
    manifest: str | Path,
    preprocessing: Mapping[str, Any],
    encoder: AttributeEncoder,
    split: str | None = "test",
    max_subjects: int | None = None,
) -> list[dict]:
    """Factual rows of ``split`` with a ground-truth counterfactual partner, preprocessed for the model.

    Returns one dict per (factual, ground truth) pair: ``{"image": (1, *spatial), "ground_truth": (1, *spatial),
    "source": factual attributes, "target": the partner's attributes, "intervened": [names], "image_id",
    "gt_id", "subject_id"}``. Both images go through ONE call of the preprocessing chain with keys
    ``("image", "ground_truth")``: the factual drives the foreground crop, so both share a grid (each image keeps
    its own percentile intensity scaling, as any scan would). ``max_subjects`` keeps the first N factual images
    (manifest order) and all of their partners.
    """
    enc = encoder
    rows = read_manifest(manifest, enc)
    by_id = {r["image_id"]: r for r in rows}
    pairs: list[tuple[dict, dict]] = []
    for r in rows:
        of = (r.get("counterfactual_of") or "").strip()
        if not of:
            continue
        f = by_id.get(of)
        if f is None:
            raise EvaluationError(f"manifest '{manifest}': row {r['image_id']!r} is a counterfactual of {of!r}, which is not in the manifest")
        if split is not None and f.get("split") != split:
            continue
        pairs.append((f, r))
    if not pairs:
        splits = sorted({r.get("split", "") for r in rows if (r.get("counterfactual_of") or "").strip()})
        raise EvaluationError(
            f"manifest '{manifest}' has no ground-truth counterfactual pairs in split {split!r} (pairs exist in: "
            f"{', '.join(splits) or 'none'}); the evaluation needs rows whose 'counterfactual_of' names a factual image")
    if max_subjects is not None:
        keep: list[str] = []
        for f, _ in pairs:
            if f["image_id"] not in keep:
                keep.append(f["image_id"])
        keep = keep[: int(max_subjects)]
        pairs = [(f, r) for f, r in pairs if f["image_id"] in keep]
    chain = _build_chain(preprocessing, ("image", "ground_truth"))
    out = []
    for f, r in pairs:
        src = _row_attrs(f, enc, f"manifest row {f['image_id']!r}")
        tgt = _row_attrs(r, enc, f"manifest row {r['image_id']!r}")
        d = chain({"image": manifest_path(f), "ground_truth": manifest_path(r)})
        out.append({
            "image": torch.as_tensor(d["image"]).float().contiguous(),
            "ground_truth": torch.as_tensor(d["ground_truth"]).float().contiguous(),
            "source": src, "target": tgt, "intervened": intervened_attributes(src, tgt, enc),
            "image_id": f["image_id"], "gt_id": r["image_id"], "subject_id": f.get("subject_id", f["image_id"]),
        })
    return out


def load_reference(
    manifest: str | Path,
    preprocessing: Mapping[str, Any],
    encoder: AttributeEncoder,
    split: str | Sequence[str] | None = "train",
    limit: int | None = None,
    factual_only: bool = True,
) -> tuple[torch.Tensor, list[dict], list[str]]:
    """Real images of ``split`` (factual rows only by default) -> ``(images (N, 1, *spatial), attribute rows, ids)``."""
    rows = read_manifest(manifest, encoder, required=("image_id", "path", "split"))
    splits = None if split is None else ([split] if isinstance(split, str) else list(split))
    sel = [r for r in rows if (splits is None or r.get("split") in splits)
           and not (factual_only and (r.get("counterfactual_of") or "").strip())]
    if limit is not None:
        sel = sel[: int(limit)]
    if not sel:
        raise EvaluationError(f"manifest '{manifest}' has no rows in split {split!r}")
    chain = _build_chain(preprocessing, ("image",))
    images = [torch.as_tensor(chain({"image": manifest_path(r)})["image"]).float() for r in sel]
    attrs = [_row_attrs(r, encoder, f"manifest row {r['image_id']!r}") for r in sel]
    return torch.stack(images), attrs, [r["image_id"] for r in sel]


def intervention_targets(rows: Sequence[Mapping], encoder: AttributeEncoder, seed: int = 0,
                         continuous_shift: tuple[float, float] = (0.25, 0.5)) -> list[dict]:
    """One single-attribute intervention per row (for δ sweeps on splits without ground-truth pairs).

    Seeded: the attribute is drawn uniformly; a categorical one moves to another class (uniform), a continuous one by
    ``U(continuous_shift) x (high - low)`` upward, or downward when upward would leave the declared range.
    """
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for row in rows:
        row = encoder.validate(row)
        a = encoder.attributes[int(torch.randint(len(encoder.attributes), (1,), generator=g))]
        t = dict(row)
        if isinstance(a, CategoricalAttribute):
            others = [c for c in a.classes if c != row[a.name]]
            t[a.name] = others[int(torch.randint(len(others), (1,), generator=g))]
        else:
            lo, hi = continuous_shift
            step = (lo + (hi - lo) * float(torch.rand(1, generator=g))) * (a.high - a.low)
            v = row[a.name] + step if row[a.name] + step <= a.high else row[a.name] - step
            t[a.name] = round(min(max(v, a.low), a.high), 1)
        out.append(t)
    return out


def make_batches(pairs: Sequence[Mapping], batch_size: int = 1) -> list[dict]:
    """Collate pair dicts into batches: tensors stacked, everything else kept as lists."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = {}
        for k in chunk[0]:
            vals = [p[k] for p in chunk]
            b[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        batches.append(b)
    return batches


def add_latent_oracle(batches: Sequence[dict], autoencode: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """Give each batch ``latent_oracle = image + D(E(ground_truth)) - D(E(image))``: a perfect diffusion model seen
    through the autoencoder ``autoencode`` (``D(E(.))``, e.g. :meth:`~.evaluator.PipelineEditor.autoencode`). It does
    not depend on δ or the edit settings, so it is computed once per pair set, not per edit."""
    with torch.no_grad():
        return [{**b, "latent_oracle": b["image"] + autoencode(b["ground_truth"]) - autoencode(b["image"])} for b in batches]
