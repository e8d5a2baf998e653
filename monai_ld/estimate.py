"""Source attributes a user does not know (``--source auto``): the bundle's attribute predictor estimates them.

The predictor is the bundle's :class:`~monai_ld.evaluation.oracle.AttributeOracle` (``models/oracle.pt``, trained by
``configs/train_oracle.json``) applied to the input as the model sees it (the same preprocessing chain). Values the
user gives always win; the estimate and its confidence go into ``record.json``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["estimate_source"]


def estimate_source(pipe: Any, input_path: str | os.PathLike, given: Mapping[str, Any] | None = None,
                    oracle: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(source, estimate)``: the estimated attributes of ``input_path`` overridden by ``given``, and what was
    estimated (``{"values", "confidence", "given", "clipped", "predictor"}``; confidence = the class probability for a
    categorical attribute, None for a continuous one: the regression head gives no probability; a continuous estimate
    outside the attribute's declared range is clipped to it, its raw value kept in ``clipped``).

    Raises:
        FileNotFoundError: no predictor (``oracle``, default ``oracle.pt`` beside the model checkpoint).
    """
    from .evaluation.oracle import AttributeOracle

    path = Path(oracle) if oracle else (Path(pipe.checkpoint).parent / "oracle.pt" if pipe.checkpoint else None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"--source auto needs the bundle's attribute predictor ({path or 'models/oracle.pt'}); "
                                "train it with the bundle's configs/train_oracle.json, or give the source attributes")
    predictor = AttributeOracle.load(path, map_location="cpu")
    x = pipe.transform()({"image": str(input_path)})["image"].unsqueeze(0).float()
    values = predictor.predict_rows(x)[0]
    probs = predictor.predict_normalised(x)
    confidence = {n: (round(float(p.max()), 4) if p.ndim > 1 else None) for n, p in probs.items()}
    given = dict(given or {})
    clipped = {}
    for a in predictor.encoder.attributes:  # a regression head can overshoot the declared range: the code cannot
        v = values.get(a.name)
        if isinstance(v, float) and hasattr(a, "low") and not a.low <= v <= a.high:
            clipped[a.name] = round(v, 2)
            values[a.name] = min(max(v, a.low), a.high)
    values = {n: (round(v, 2) if isinstance(v, float) else v) for n, v in values.items()}
    return {**values, **given}, {"values": values, "confidence": confidence, "given": sorted(given),
                                 "clipped": clipped, "predictor": str(path.resolve())}
