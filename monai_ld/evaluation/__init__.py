"""Counterfactual evaluation for monai_ld, as a library of tensor/callable-based metrics (2D and 3D).

Modules: :mod:`.oracle` (anti-causal predictors + the offline feature network), :mod:`.realism` (FID, KID, MMD),
:mod:`.similarity` (L1, SSIM, MS-SSIM, PSNR, masked), :mod:`.axioms` (effectiveness, composition, reversibility,
minimality, ground-truth error), :mod:`.downstream` (synthetic-vs-real classifier AUC), :mod:`.drift_search`
(δ grid search), :mod:`.report` (JSON / Markdown / PNG), :mod:`.summaries` (``report.md`` of the evaluation and sweep
reports), :mod:`.pairs` (ground-truth pairs and reference images from a manifest), :mod:`.evaluator` (an
ignite/MONAI ``Evaluator`` that edits held-out ground-truth pairs and scores them, with the metrics of
:mod:`.set_metrics`), :mod:`.oracle_training` (the oracle job of ``configs/train_oracle.json``), :mod:`.volumes` (regional volume change
from images) and :mod:`.volume_oracle` (a categorical attribute from regional volumes: the brain's second oracle).

This package sits below the pipeline: the model under test comes in as an edit function or a pipeline object. The
jobs that load a model and write report folders (``monai-ld evaluate`` / ``sweep-drift``) are :mod:`monai_ld.jobs`.
"""

from ._checks import EvaluationError
from .axioms import (
    EditFn,
    composition,
    effectiveness,
    effectiveness_from_images,
    ground_truth_error,
    macro_f1,
    minimality,
    minimality_bins,
    reversibility,
)
from .downstream import binary_labels, downstream_auc, roc_auc
from .drift_search import (
    drift_grid,
    mean_image_l1,
    oracle_loss,
    parse_drifts,
    search_drift,
    search_drift_counterfactual,
    search_drift_distribution,
)
from .evaluator import CounterfactualEvaluator, PipelineEditor, evaluate_counterfactuals
from .oracle import (
    ORACLE_FEATURE_NETWORK,
    AttributeOracle,
    FeatureExtractor,
    attribute_targets,
    extract_features,
    train_oracle,
)
from .oracle_training import fit_oracle, train_oracle_from_manifest
from .pairs import intervened_attributes, intervention_targets, load_counterfactual_pairs, load_reference
from .realism import fid, gaussian_kernel_bandwidth, image_mmd, kid, mmd, realism_metrics
from .report import (
    markdown_table,
    plot_counterfactual_grid,
    plot_drift_curve,
    to_jsonable,
    write_json,
    write_markdown,
    write_report,
)
from .set_metrics import CounterfactualSetMetrics, counterfactual_metrics
from .similarity import MS_SSIM_WEIGHTS, l1, ms_ssim, ms_ssim_config, psnr, similarity_metrics, ssim, ssim_window

__all__ = [
    "EvaluationError",
    # oracle / features
    "ORACLE_FEATURE_NETWORK",
    "AttributeOracle",
    "FeatureExtractor",
    "train_oracle",
    "extract_features",
    "attribute_targets",
    # realism
    "fid",
    "kid",
    "mmd",
    "image_mmd",
    "gaussian_kernel_bandwidth",
    "realism_metrics",
    # similarity
    "MS_SSIM_WEIGHTS",
    "l1",
    "ssim",
    "ms_ssim",
    "psnr",
    "ssim_window",
    "ms_ssim_config",
    "similarity_metrics",
    # axioms
    "EditFn",
    "effectiveness",
    "effectiveness_from_images",
    "macro_f1",
    "composition",
    "reversibility",
    "minimality",
    "minimality_bins",
    "ground_truth_error",
    # downstream
    "roc_auc",
    "binary_labels",
    "downstream_auc",
    # drift search
    "drift_grid",
    "parse_drifts",
    "search_drift",
    "search_drift_distribution",
    "search_drift_counterfactual",
    "mean_image_l1",
    "oracle_loss",
    # reports
    "to_jsonable",
    "write_json",
    "markdown_table",
    "write_markdown",
    "plot_drift_curve",
    "plot_counterfactual_grid",
    "write_report",
    # evaluators over manifests and bundles
    "CounterfactualEvaluator",
    "CounterfactualSetMetrics",
    "PipelineEditor",
    "counterfactual_metrics",
    "evaluate_counterfactuals",
    "intervened_attributes",
    "intervention_targets",
    "load_counterfactual_pairs",
    "load_reference",
    # the oracle job
    "fit_oracle",
    "train_oracle_from_manifest",
]
