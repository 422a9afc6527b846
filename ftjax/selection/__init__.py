"""Pre-training data selection: UOT scores, cosine k-means and baselines."""

from ftjax.selection.baselines import greedy_ot_scores
from ftjax.selection.baselines import label_overlap_units
from ftjax.selection.baselines import random_units
from ftjax.selection.features import extract_features
from ftjax.selection.features import load_cached_features
from ftjax.selection.kmeans import KMeansResult
from ftjax.selection.kmeans import kmeans
from ftjax.selection.uot import UOTScores
from ftjax.selection.uot import class_means
from ftjax.selection.uot import cost_matrix
from ftjax.selection.uot import select_top_k
from ftjax.selection.uot import solve_uot
from ftjax.selection.uot import uot_scores
from ftjax.selection.uot import uot_scores_batched

__all__ = [
    "KMeansResult",
    "UOTScores",
    "class_means",
    "cost_matrix",
    "extract_features",
    "greedy_ot_scores",
    "kmeans",
    "label_overlap_units",
    "load_cached_features",
    "random_units",
    "select_top_k",
    "solve_uot",
    "uot_scores",
    "uot_scores_batched",
]
