"""Adapters from the tables of the paper's datasets to a :class:`~monai_ld.data.manifest.Manifest`.

The datasets are credential-gated; users bring their own files. Each adapter reads the table in the layout the
dataset publishes, maps values to this package's attributes, and splits per subject.

- **CheXpert** ``train.csv`` / ``valid.csv`` -> ``sex`` (F/M), ``age`` (years), ``cardiomegaly``,
  ``pleural_effusion``, ``pneumonia`` (absent/present). Labels are ``1.0`` positive, ``0.0`` negative, ``-1.0``
  uncertain, blank not mentioned. Uncertainty policy (Irvin et al. 2019): ``"U-ones"`` (-1 -> present),
  ``"U-zeros"`` (-1 -> absent), ``"ignore"`` (drop images with an uncertain selected label). Blank -> absent
  (``blank="zero"``, the usual reading) or drop the image (``blank="drop"``). Subject id = ``patientXXXXX`` in Path.
- **ADNI** ``ADNIMERGE`` -> ``age`` = ``AGE`` (baseline) + ``Years_bl``, ``sex`` from ``PTGENDER``, ``diagnosis``
  from ``DX`` (``CN``, ``MCI``, ``Dementia``) or, without a ``DX`` column, ``DX_bl`` (``CN``, ``SMC``, ``EMCI``,
  ``LMCI``, ``AD``). Mapping: CN, SMC -> CN; MCI, EMCI, LMCI -> MCI; Dementia, AD -> AD.
- **OASIS-3** clinical/demographic table -> subject from ``OASISID``/``Subject``, ``age`` from ``age at visit``
  (or ``Age``/``ageAtEntry``), ``sex`` from ``M/F`` (or ``GENDER``: 1 = male, 2 = female), ``diagnosis`` from ``dx1``
  when present, else from the CDR: CDR 0 -> CN, 0.5 -> MCI, >= 1 -> AD. ``dx1`` mapping: "Cognitively normal",
  "No dementia" -> CN; "AD Dementia", "AD dem ...", "DAT" -> AD; "0.5 in memory only", "uncertain dementia",
  "Unc: ques. Impairment", "Incipient ...", "MCI" -> MCI; other diagnoses (vascular, Lewy body, frontotemporal and
  other non-AD dementias) are not CN/MCI/AD and the row is dropped (counted in ``Manifest.notes``).

Images are joined to rows by ``path_column`` (a column holding the path) or ``path_pattern``, a ``str.format``
pattern over the row's columns and the normalised fields ``subject_id``, ``visit``, e.g.
``"{PTID}/{VISCODE}/T1.nii.gz"`` or ``"{subject_id}/{visit}/anat/T1w.nii.gz"``. Rows the encoder cannot take (unknown
sex, age out of range, unmappable diagnosis) are dropped with ``on_invalid="skip"`` (default; counts in
``Manifest.notes``) or raise with ``on_invalid="raise"``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_ld.conditioning import AttributeEncoder, CategoricalAttribute, ConditionError, ContinuousAttribute
from monai_ld.data.manifest import Manifest, _is_blank, assign_splits, read_rows

__all__ = [
    "CHEXPERT_COLUMNS",
    "chexpert_encoder",
    "brain_encoder",
    "chexpert_manifest",
    "adni_manifest",
    "oasis3_manifest",
    "map_adni_diagnosis",
    "map_oasis_diagnosis",
]

CHEXPERT_COLUMNS = (
    "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
    "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)
_CHEXPERT_LABELS = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion", "pneumonia": "Pneumonia"}
POLICIES = ("U-ones", "U-zeros", "ignore")


def chexpert_encoder() -> AttributeEncoder:
    """sex (F, M), age [0, 100] years, cardiomegaly / pleural_effusion / pneumonia (absent, present): dim 9."""
    return AttributeEncoder([
        CategoricalAttribute("sex", ("F", "M")),
        ContinuousAttribute("age", 0, 100, "years"),
        *[CategoricalAttribute(n, ("absent", "present")) for n in _CHEXPERT_LABELS],
    ])


def brain_encoder(age_range: tuple[float, float] = (40, 100)) -> AttributeEncoder:
    """age [40, 100] years, sex (F, M), diagnosis (CN, MCI, AD): dim 6 (ADNI and OASIS-3)."""
    return AttributeEncoder([
        ContinuousAttribute("age", age_range[0], age_range[1], "years"),
        CategoricalAttribute("sex", ("F", "M")),
        CategoricalAttribute("diagnosis", ("CN", "MCI", "AD")),
    ])


class _Skip(Exception):
    pass


def _sex(v: Any) -> str:
    s = "" if v is None else str(v).strip().lower()
    if s in ("f", "female", "2", "2.0", "w"):
        return "F"
    if s in ("m", "male", "1", "1.0"):
        return "M"
    raise _Skip(f"sex {v!r} is not F/M")


def _check_columns(rows: Sequence[Mapping], needed: Sequence[str], source: str) -> None:
    cols = set(k for r in rows[:1] for k in r)
    missing = [c for c in needed if c not in cols]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {sorted(cols)}")


def _first_column(rows: Sequence[Mapping], candidates: Sequence[str], source: str, what: str) -> str:
    cols = {k for r in rows[:1] for k in r}
    lower = {c.lower(): c for c in cols}
    for c in candidates:
        if c in cols:
            return c
        if c.lower() in lower:
            return lower[c.lower()]
    raise ValueError(f"{source}: no {what} column; accepted names: {list(candidates)}; found {sorted(cols)}")


def _finish(rows: list[dict], skipped: Counter, encoder: AttributeEncoder, extras: Sequence[str], root, split_fractions,
            seed: int, source: str) -> Manifest:
    if not rows:
        raise ValueError(f"{source}: no usable rows (skipped: {dict(skipped) or 'none'})")
    if split_fractions is not None:
        rows = assign_splits(rows, split_fractions, seed)
    m = Manifest.from_rows(rows, encoder, extras, root, require_split=split_fractions is not None, source=source)
    m.notes = [f"skipped {n} row(s): {why}" for why, n in sorted(skipped.items())]
    return m


def _record(on_invalid: str, skipped: Counter, where: str, why: str) -> None:
    if on_invalid == "raise":
        raise ConditionError(f"{where}: {why}")
    skipped[why] += 1


def _path_for(row: Mapping, fields: Mapping, path_column: str | None, path_pattern: str | None, source: str) -> str:
    if path_column is not None:
        v = row.get(path_column)
        if _is_blank(v):
            raise _Skip(f"no path in column '{path_column}'")
        return str(v)
    if path_pattern is None:
        raise ValueError(f"{source}: give path_column or path_pattern to join rows to image files")
    values = {**{str(k): ("" if v is None else v) for k, v in row.items()}, **fields}
    try:
        return path_pattern.format_map(values)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{source}: path_pattern {path_pattern!r} needs field {e}; available: {sorted(values)}") from None


def chexpert_manifest(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                      policy: str = "U-ones", blank: str = "zero", frontal_only: bool = False,
                      encoder: AttributeEncoder | None = None, split_fractions: Sequence[float] | None = (0.7, 0.15, 0.15),
                      seed: int = 0, on_invalid: str = "skip") -> Manifest:
    """CheXpert ``train.csv`` -> manifest (attributes of :func:`chexpert_encoder`; extra columns ``view``, ``ap_pa``,
    ``study``). ``image_root`` is the folder the ``Path`` column is relative to (the one holding
    ``CheXpert-v1.0-small/``); default the CSV's parent's parent."""
    if policy not in POLICIES:
        raise ValueError(f"uncertainty policy {policy!r}; accepted: {', '.join(POLICIES)}")
    if blank not in ("zero", "drop"):
        raise ValueError(f"blank {blank!r}; accepted: 'zero', 'drop'")
    if on_invalid not in ("skip", "raise"):
        raise ValueError(f"on_invalid {on_invalid!r}; accepted: 'skip', 'raise'")
    enc = encoder or chexpert_encoder()
    source = f"CheXpert table '{csv_path}'"
    raw, _ = read_rows(csv_path)
    if not raw:
        raise ValueError(f"{source}: no rows")
    _check_columns(raw, ["Path", "Sex", "Age", "Frontal/Lateral", *_CHEXPERT_LABELS.values()], source)
    rows, skipped = [], Counter()
    for i, r in enumerate(raw, start=1):
        where = f"{source} row {i}"
        path = str(r["Path"])
        m = re.search(r"(patient\d+)", path)
        if not m:
            raise ValueError(f"{where}: column 'Path' = {path!r} holds no 'patientXXXXX' subject id")
        if frontal_only and str(r.get("Frontal/Lateral")).strip().lower() != "frontal":
            continue
        try:
            out = {"path": path, "subject_id": m.group(1), "sex": _sex(r["Sex"])}
            age = r["Age"]
            if _is_blank(age):
                raise _Skip("age is blank")
            out["age"] = float(age)
            for name, col in _CHEXPERT_LABELS.items():
                v = r.get(col)
                if _is_blank(v):
                    if blank == "drop":
                        raise _Skip(f"'{col}' is blank (blank='drop')")
                    v = 0.0
                v = float(v)
                if v == -1.0:
                    if policy == "ignore":
                        raise _Skip(f"'{col}' is uncertain (policy 'ignore')")
                    v = 1.0 if policy == "U-ones" else 0.0
                if v not in (0.0, 1.0):
                    raise ValueError(f"{where}: column '{col}' = {r.get(col)!r}; accepted: 1.0, 0.0, -1.0 or blank")
                out[name] = "present" if v == 1.0 else "absent"
            enc.validate({k: out[k] for k in enc.names})
        except _Skip as e:
            _record(on_invalid, skipped, where, str(e))
            continue
        except ConditionError as e:
            _record(on_invalid, skipped, where, str(e).split(". Accepted")[0])
            continue
        sm = re.search(r"(study\d+)", path)
        out.update({"view": r.get("Frontal/Lateral"), "ap_pa": r.get("AP/PA"), "study": sm.group(1) if sm else None})
        rows.append(out)
    root = image_root if image_root is not None else Path(csv_path).resolve().parent.parent
    return _finish(rows, skipped, enc, ["view", "ap_pa", "study"], root, split_fractions, seed, source)


_ADNI_DX = {"cn": "CN", "smc": "CN", "nl": "CN", "mci": "MCI", "emci": "MCI", "lmci": "MCI", "dementia": "AD", "ad": "AD"}


def map_adni_diagnosis(value: Any) -> str:
    """ADNI ``DX``/``DX_bl`` -> CN/MCI/AD (CN, SMC -> CN; MCI, EMCI, LMCI -> MCI; Dementia, AD -> AD)."""
    key = "" if value is None else str(value).strip().lower()
    if key not in _ADNI_DX:
        raise _Skip(f"diagnosis {value!r} is not one of CN, SMC, MCI, EMCI, LMCI, Dementia, AD")
    return _ADNI_DX[key]


def adni_manifest(table_path: str | os.PathLike, path_pattern: str | None = None, path_column: str | None = None,
                  image_root: str | os.PathLike | None = None, encoder: AttributeEncoder | None = None,
                  split_fractions: Sequence[float] | None = (0.7, 0.15, 0.15), seed: int = 0,
                  on_invalid: str = "skip") -> Manifest:
    """ADNIMERGE-style table -> manifest with age/sex/diagnosis (:func:`brain_encoder`); extra column ``visit``."""
    enc = encoder or brain_encoder()
    source = f"ADNI table '{table_path}'"
    raw, _ = read_rows(table_path)
    if not raw:
        raise ValueError(f"{source}: no rows")
    _check_columns(raw, ["PTID", "AGE", "PTGENDER"], source)
    dx_col = _first_column(raw, ["DX", "DX_bl"], source, "diagnosis")
    rows, skipped = [], Counter()
    for i, r in enumerate(raw, start=1):
        where = f"{source} row {i}"
        try:
            if _is_blank(r.get("AGE")):
                raise _Skip("AGE is blank")
            years = r.get("Years_bl")
            age = float(r["AGE"]) + (0.0 if _is_blank(years) else float(years))
            visit = "bl" if _is_blank(r.get("VISCODE")) else str(r["VISCODE"])
            out = {"subject_id": str(r["PTID"]), "age": round(age, 2), "sex": _sex(r["PTGENDER"]),
                   "diagnosis": map_adni_diagnosis(r.get(dx_col)), "visit": visit}
            out["path"] = _path_for(r, {"subject_id": out["subject_id"], "visit": visit}, path_column, path_pattern, source)
            enc.validate({k: out[k] for k in enc.names})
        except _Skip as e:
            _record(on_invalid, skipped, where, str(e))
            continue
        except ConditionError as e:
            _record(on_invalid, skipped, where, str(e).split(". Accepted")[0])
            continue
        rows.append(out)
    return _finish(rows, skipped, enc, ["visit"], image_root, split_fractions, seed, source)


def map_oasis_diagnosis(dx1: Any = None, cdr: Any = None) -> str:
    """OASIS-3 ``dx1`` text (preferred when present) or CDR -> CN/MCI/AD; see the module docstring."""
    if not _is_blank(dx1):
        s = str(dx1).strip().lower()
        if s in ("cognitively normal", "normal", "no dementia"):
            return "CN"
        if s.startswith(("ad dem", "dat")) or "alzheimer" in s:
            return "AD"
        if s.startswith(("0.5 in memory only", "uncertain dementia", "unc: ques. impairment", "incipient")) or "mci" in s:
            return "MCI"
        raise _Skip(f"dx1 {dx1!r} is not a CN/MCI/AD diagnosis")
    if _is_blank(cdr):
        raise _Skip("no dx1 and no CDR")
    c = float(cdr)
    if c == 0:
        return "CN"
    if c == 0.5:
        return "MCI"
    if c >= 1:
        return "AD"
    raise _Skip(f"CDR {cdr!r} is not 0, 0.5, 1, 2 or 3")


def oasis3_manifest(table_path: str | os.PathLike, path_pattern: str | None = None, path_column: str | None = None,
                    image_root: str | os.PathLike | None = None, encoder: AttributeEncoder | None = None,
                    split_fractions: Sequence[float] | None = (0.7, 0.15, 0.15), seed: int = 0,
                    on_invalid: str = "skip") -> Manifest:
    """OASIS-3-style table -> manifest with age/sex/diagnosis (:func:`brain_encoder`); extra column ``visit``
    (from ``days_to_visit``/``Date``/``MR ID``/``label`` when present)."""
    enc = encoder or brain_encoder()
    source = f"OASIS-3 table '{table_path}'"
    raw, _ = read_rows(table_path)
    if not raw:
        raise ValueError(f"{source}: no rows")
    subj_col = _first_column(raw, ["OASISID", "Subject", "Subject ID", "subject_id"], source, "subject")
    age_col = _first_column(raw, ["age at visit", "Age", "ageAtVisit", "ageAtEntry", "AgeatEntry"], source, "age")
    sex_col = _first_column(raw, ["M/F", "GENDER", "Sex"], source, "sex")
    cols = {k for k in raw[0]}
    dx_col = next((c for c in cols if c.lower() == "dx1"), None)
    cdr_col = next((c for c in cols if c.lower() in ("cdr", "cdrtot")), None)
    if dx_col is None and cdr_col is None:
        raise ValueError(f"{source}: no diagnosis column; accepted: dx1 or CDR/cdr; found {sorted(cols)}")
    visit_col = next((c for c in ("days_to_visit", "Date", "MR ID", "label", "session") if c in cols), None)
    rows, skipped = [], Counter()
    for i, r in enumerate(raw, start=1):
        where = f"{source} row {i}"
        try:
            if _is_blank(r.get(age_col)):
                raise _Skip("age is blank")
            visit = None if visit_col is None or _is_blank(r.get(visit_col)) else str(r[visit_col])
            out = {"subject_id": str(r[subj_col]), "age": float(r[age_col]), "sex": _sex(r[sex_col]),
                   "diagnosis": map_oasis_diagnosis(r.get(dx_col) if dx_col else None, r.get(cdr_col) if cdr_col else None),
                   "visit": visit}
            out["path"] = _path_for(r, {"subject_id": out["subject_id"], "visit": visit or ""}, path_column, path_pattern, source)
            enc.validate({k: out[k] for k in enc.names})
        except _Skip as e:
            _record(on_invalid, skipped, where, str(e))
            continue
        except ConditionError as e:
            _record(on_invalid, skipped, where, str(e).split(". Accepted")[0])
            continue
        rows.append(out)
    return _finish(rows, skipped, enc, ["visit"], image_root, split_fractions, seed, source)
