"""fastssl.eval: evaluation of frozen self-supervised features.

- :func:`knn_classify` / :func:`knn_accuracy`: exact cosine kNN with weighted (DINO) or majority (ISD/MSF) votes on
  FAISS GPU/CPU, chunked torch or fastssl's Triton top-k, all giving identical predictions (:mod:`.knn`,
  :mod:`.neighbors`).
- :func:`extract_features`: L2-normalized fp16 features with AMP, DDP sharding and an on-disk cache
  (:mod:`.features`).
- :func:`linear_probe_sgd` (ISD/MSF protocol), :func:`logistic_regression_lbfgs` (transfer protocol), label subsets
  (:mod:`.linear_probe`).
- :class:`TeacherStudentMonitor` (ISD Fig. 4) and :class:`PurityMeter` (MSF Fig. 4) (:mod:`.monitor`).
- :func:`plot_embedding`: t-SNE PNG (:mod:`.embedding_plot`); :func:`load_backbone` (:mod:`.checkpoint`).
- ``fastssl eval knn|linear`` (:mod:`.cli`).

Heavy optional dependencies (FAISS, torchvision, scikit-learn, matplotlib, safetensors, tqdm) are imported lazily.
"""

from fastssl.eval.checkpoint import build_backbone, load_backbone
from fastssl.eval.embedding_plot import EmbeddingPlot, plot_embedding
from fastssl.eval.features import (
    Features,
    checkpoint_fingerprint,
    data_fingerprint,
    eval_transform,
    extract_features,
    model_fingerprint,
)
from fastssl.eval.knn import KNNAccuracy, knn_accuracy, knn_classify, rank_classes
from fastssl.eval.linear_probe import (
    LinearProbeResult,
    Standardizer,
    label_subset,
    linear_probe_sgd,
    load_subset_indices,
    logistic_regression_lbfgs,
)
from fastssl.eval.monitor import PurityMeter, TeacherStudentMonitor
from fastssl.eval.neighbors import Neighbors, nearest_neighbors

__all__ = [
    "EmbeddingPlot",
    "Features",
    "KNNAccuracy",
    "LinearProbeResult",
    "Neighbors",
    "PurityMeter",
    "Standardizer",
    "TeacherStudentMonitor",
    "build_backbone",
    "checkpoint_fingerprint",
    "data_fingerprint",
    "eval_transform",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "label_subset",
    "linear_probe_sgd",
    "load_backbone",
    "load_subset_indices",
    "logistic_regression_lbfgs",
    "model_fingerprint",
    "nearest_neighbors",
    "plot_embedding",
    "rank_classes",
]
