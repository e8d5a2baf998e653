"""Manifests: one row per image, ``path``, ``subject_id``, ``split`` + attribute columns (+ declared extra columns).

A manifest is a list of plain dicts (``rows``) plus the names of its attribute and extra columns. It reads/writes
CSV (header row) and JSON (``{"attributes": [...encoder config...], "extra_columns": [...], "rows": [...]}`` or a
bare list of rows), validates against an :class:`~monai_ld.conditioning.AttributeEncoder`, and produces the list of
dicts ``monai.data.Dataset`` takes::

    m = Manifest.read("manifest.csv", encoder=enc, extra_columns=["visit"])
    train = monai.data.Dataset(m.to_monai(split="train"), transform=brain_mri_transforms(encoder=enc))

Splits are assigned per subject (:func:`assign_splits`): all images of one subject fall in one split, so a model is
never evaluated on a subject it was trained on.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_ld.conditioning import AttributeEncoder, ConditionError
from monai_ld.utils import atomic_write

__all__ = [
    "REQUIRED_COLUMNS",
    "SPLITS",
    "Manifest",
    "assign_splits",
    "validate_rows",
    "read_rows",
    "write_rows",
]

REQUIRED_COLUMNS = ("path", "subject_id", "split")
SPLITS = ("train", "val", "test")


def _is_blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _coerce(v: Any) -> Any:
    """CSV cells are strings; numbers go back to int/float, blanks to None."""
    if _is_blank(v):
        return None
    if isinstance(v, str):
        s = v.strip()
        try:
            f = float(s)
        except ValueError:
            return s
        return int(f) if f.is_integer() and "." not in s and "e" not in s.lower() else f
    return v


def read_rows(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a CSV or JSON manifest. Returns ``(rows, header)``; ``header`` holds the JSON keys besides ``rows``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest '{p}' does not exist")
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest '{p}' is not valid JSON: {e}") from None
        if isinstance(obj, list):
            return [dict(r) for r in obj], {}
        if not isinstance(obj, Mapping) or not isinstance(obj.get("rows"), list):
            raise ValueError(f"manifest '{p}': JSON must be a list of rows or an object with a 'rows' list")
        return [dict(r) for r in obj["rows"]], {k: v for k, v in obj.items() if k != "rows"}
    if p.suffix.lower() in (".csv", ".tsv"):
        with open(p, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            rows = [{k: _coerce(v) for k, v in r.items()} for r in reader]
        return rows, {}
    raise ValueError(f"manifest '{p}': unsupported format '{p.suffix}'; accepted: .csv, .tsv, .json")


def _atomic_write_text(path: Path, text: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass overwrite=True to replace it")
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None,
               header: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write rows to CSV or JSON atomically (temporary file + ``os.replace``); never replaces a file unless asked."""
    p = Path(path)
    cols = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    if p.suffix.lower() == ".json":
        obj: Any = {**(header or {}), "rows": [{c: r.get(c) for c in cols} for r in rows]} if header else \
            [{c: r.get(c) for c in cols} for r in rows]
        _atomic_write_text(p, json.dumps(obj, indent=1) + "\n", overwrite)
    elif p.suffix.lower() == ".csv":
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
        _atomic_write_text(p, buf.getvalue(), overwrite)
    else:
        raise ValueError(f"manifest '{p}': unsupported format '{p.suffix}'; accepted: .csv, .json")
    return p


def validate_rows(rows: Sequence[Mapping[str, Any]], encoder: AttributeEncoder | None = None,
                  extra_columns: Iterable[str] = (), require_split: bool = True, allow_missing_values: bool = False,
                  check_files: bool = False, root: str | os.PathLike | None = None, source: str = "manifest") -> list[str]:
    """Check a manifest; return its attribute columns (in encoder order).

    Every column must be one of ``path``, ``subject_id``, ``split``, an attribute of ``encoder`` or a declared extra
    column. Every attribute value must be valid for the encoder (blank only with ``allow_missing_values``).

    Raises:
        ConditionError: unknown attribute column / invalid attribute value, naming the row (1-based data row) and
            the column; ``ValueError`` for missing required columns, bad split names, missing files.
    """
    if not rows:
        raise ValueError(f"{source}: no rows")
    extras = set(extra_columns)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    required = [c for c in REQUIRED_COLUMNS if require_split or c != "split"]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{source}: missing required column(s) {missing}; a manifest needs {list(required)} "
                         f"plus attribute columns (found {columns})")
    attr_cols: list[str] = []
    if encoder is not None:
        unknown = [c for c in columns if c not in REQUIRED_COLUMNS and c not in extras and c not in encoder.names]
        if unknown:
            raise ConditionError(f"{source}: column(s) {unknown} are not attributes of the model "
                                 f"(accepted: {encoder.describe()}); declare metadata columns in extra_columns")
        absent = [n for n in encoder.names if n not in columns]
        if absent:
            raise ConditionError(f"{source}: no column for attribute(s) {absent}; accepted: {encoder.describe()}")
        attr_cols = list(encoder.names)
    problems: list[str] = []
    attr_problem = False
    for i, r in enumerate(rows, start=1):
        where = f"{source} row {i} (subject_id={r.get('subject_id')!r})"
        for c in required:
            if _is_blank(r.get(c)):
                problems.append(f"{where}: column '{c}' is empty")
        if require_split and not _is_blank(r.get("split")) and str(r["split"]) not in SPLITS:
            problems.append(f"{where}: column 'split' = {r['split']!r}; accepted: {', '.join(SPLITS)}")
        for c in attr_cols:
            v = r.get(c)
            if _is_blank(v):
                if not allow_missing_values:
                    attr_problem = True
                    problems.append(f"{where}: column '{c}' is empty; accepted: {encoder[c].describe()}")
                continue
            try:
                encoder[c].validate(v)
            except ConditionError as e:
                attr_problem = True
                problems.append(f"{where}: column '{c}': {e}")
        if check_files and not _is_blank(r.get("path")):
            p = Path(root, str(r["path"])) if root is not None else Path(str(r["path"]))
            if not p.exists():
                problems.append(f"{where}: column 'path': file '{p}' does not exist")
        if len(problems) >= 20:
            break
    if problems:
        more = " (stopped after 20 problems)" if len(problems) >= 20 else ""
        raise (ConditionError if attr_problem else ValueError)("; ".join(problems) + more)
    return attr_cols


def assign_splits(rows: Sequence[Mapping[str, Any]], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                  subject_key: str = "subject_id", names: Sequence[str] = SPLITS) -> list[dict[str, Any]]:
    """Subject-level random split: returns new rows with ``split`` set; all images of a subject share one split.

    Subjects (sorted, then shuffled with ``random.Random(seed)``) are cut by cumulative fractions with rounding, so
    the result depends only on the set of subject ids and the seed, not on row order.
    """
    if len(fractions) != len(names):
        raise ValueError(f"fractions {tuple(fractions)} must have one entry per split {tuple(names)}")
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    missing = [i for i, r in enumerate(rows, start=1) if _is_blank(r.get(subject_key))]
    if missing:
        raise ValueError(f"rows {missing[:10]} have no '{subject_key}'; splits are assigned per subject")
    subjects = sorted({str(r[subject_key]) for r in rows})
    random.Random(seed).shuffle(subjects)
    n = len(subjects)
    bounds, acc = [], 0.0
    for f in fractions:
        acc += f
        bounds.append(round(acc * n))
    which: dict[str, str] = {}
    start = 0
    for name, end in zip(names, bounds):
        for s in subjects[start:end]:
            which[s] = name
        start = end
    return [{**r, "split": which[str(r[subject_key])]} for r in rows]


@dataclass
class Manifest:
    """Rows + column roles. ``attribute_columns`` follow the encoder order; ``extra_columns`` are kept metadata."""

    rows: list[dict[str, Any]]
    attribute_columns: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    root: str | None = None
    encoder: AttributeEncoder | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return [*REQUIRED_COLUMNS, *self.attribute_columns, *[c for c in self.extra_columns if c not in REQUIRED_COLUMNS]]

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], encoder: AttributeEncoder | None = None,
                  extra_columns: Iterable[str] = (), root: str | os.PathLike | None = None, require_split: bool = True,
                  allow_missing_values: bool = False, check_files: bool = False, source: str = "manifest") -> Manifest:
        rows = [dict(r) for r in rows]
        extras = list(extra_columns)
        attr = validate_rows(rows, encoder, extras, require_split, allow_missing_values, check_files, root, source)
        if encoder is None:  # without an encoder, every non-required column that is not extra is an attribute column
            attr = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in REQUIRED_COLUMNS and c not in extras]
        return cls(rows, attr, extras, None if root is None else str(root), encoder)

    @classmethod
    def read(cls, path: str | os.PathLike, encoder: AttributeEncoder | None = None, extra_columns: Iterable[str] = (),
             root: str | os.PathLike | None = None, **kwargs) -> Manifest:
        """Read CSV/JSON. A JSON header may carry ``attributes`` (encoder config, used when ``encoder`` is None) and
        ``extra_columns``. Relative paths resolve against ``root`` (default: the manifest's folder)."""
        rows, header = read_rows(path)
        if encoder is None and header.get("attributes"):
            encoder = AttributeEncoder.from_config(header["attributes"])
        extras = list(dict.fromkeys([*extra_columns, *header.get("extra_columns", [])]))
        root = Path(path).parent if root is None else root
        return cls.from_rows(rows, encoder, extras, root, source=f"manifest '{path}'", **kwargs)

    def write(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write CSV or JSON (JSON keeps the encoder config and extra column names)."""
        header = None
        if str(path).lower().endswith(".json"):
            header = {"extra_columns": self.extra_columns}
            if self.encoder is not None:
                header = {"attributes": self.encoder.to_config(), **header}
        return write_rows(self.rows, path, self.columns, header, overwrite)

    def with_splits(self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> Manifest:
        return Manifest(assign_splits(self.rows, fractions, seed), list(self.attribute_columns), list(self.extra_columns),
                        self.root, self.encoder)

    def subjects(self, split: str | None = None) -> list[str]:
        return sorted({str(r["subject_id"]) for r in self.rows if split is None or r.get("split") == split})

    def to_monai(self, split: str | None = None, image_key: str = "image", absolute_paths: bool = True) -> list[dict]:
        """List of dicts for ``monai.data.Dataset``: ``{image_key: path, "subject_id", "split", <attributes>, <extras>}``.

        Paths are made absolute against ``root`` when relative. Encode attributes in the transform chain with
        :class:`monai_ld.transforms.EncodeAttributesd` (gives ``"condition"`` of shape ``(1, dim)`` per sample).
        """
        if split is not None and split not in SPLITS:
            raise ValueError(f"split {split!r}; accepted: {', '.join(SPLITS)}")
        out = []
        for r in self.rows:
            if split is not None and r.get("split") != split:
                continue
            d = {k: v for k, v in r.items() if k != "path"}
            p = str(r["path"])
            if absolute_paths and self.root is not None and not os.path.isabs(p):
                p = str(Path(self.root, p))
            d[image_key] = p
            out.append(d)
        return out
