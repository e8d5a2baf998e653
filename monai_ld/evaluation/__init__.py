"""Counterfactual evaluation for monai_ld, as a library of tensor/callable-based metrics (2D and 3D).

Modules: :mod:`.oracle` (anti-causal predictors + the offline feature network), :mod:`.realism` (FID, KID, MMD),
:mod:`.similarity` (L1, SSIM, MS-SSIM, PSNR, masked), :mod:`.axioms` (effectiveness, composition, reversibility,
minimality, ground-truth error), :mod:`.downstream` (synthetic-vs-real classifier AUC), :mod:`.drift_search`
(δ grid search), :mod:`.report` (JSON / Markdown / PNG), :mod:`.evaluator` (an ignite/MONAI ``Evaluator`` that edits
held-out ground-truth pairs and scores them), :mod:`.workflows` (what bundle configs and ``monai-ld evaluate`` /
``monai-ld sweep-drift`` call).
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
    search_drift,
    search_drift_counterfactual,
    search_drift_distribution,
)
from .oracle import (
    ORACLE_FEATURE_NETWORK,
    AttributeOracle,
    FeatureExtractor,
    attribute_targets,
    extract_features,
    train_oracle,
)
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
from .similarity import MS_SSIM_WEIGHTS, l1, ms_ssim, ms_ssim_config, psnr, similarity_metrics, ssim, ssim_window
from . import evaluator, workflows  # noqa: E402  (``from monai_ld.evaluation import workflows`` in bundle configs)
from .evaluator import (
    CounterfactualEvaluator,
    CounterfactualSetMetrics,
    PipelineEditor,
    counterfactual_metrics,
    evaluate_counterfactuals,
    intervention_targets,
    load_counterfactual_pairs,
    load_reference,
)
from .workflows import run_evaluation, run_sweep, train_oracle_from_manifest

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
    "intervention_targets",
    "load_counterfactual_pairs",
    "load_reference",
    "run_evaluation",
    "run_sweep",
    "train_oracle_from_manifest",
]
