"""Whole evaluation jobs on a trained model: what ``configs/evaluate.json`` and ``monai-ld evaluate|sweep-drift`` run.

They load the model as a :class:`~monai_ld.pipeline.CounterfactualPipeline`, so they sit in the pipeline layer, and
score its edits with :mod:`monai_ld.evaluation` (metrics, oracle, reports), which does not know the pipeline.

- :func:`run_sweep` (:mod:`.sweep`) — the δ grid search on held-out images (default: the validation split).
- :func:`run_evaluation` (:mod:`.evaluate`) — the ground-truth pairs of the test split, for a list of δ.

Missing oracle file: effectiveness, minimality and realism are reported as ``null`` with the reason under ``notes``
(the evaluation still runs); a counterfactual δ sweep then falls back to the distribution objective (noted). The
oracle itself is trained by :func:`monai_ld.evaluation.train_oracle_from_manifest` (``configs/train_oracle.json``).
"""

from .common import Job, load_oracle, load_pipeline, open_job
from .evaluate import run_evaluation
from .sweep import SweepSpec, run_sweep

__all__ = ["Job", "SweepSpec", "load_oracle", "load_pipeline", "open_job", "run_evaluation", "run_sweep"]
