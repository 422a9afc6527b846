"""Pure loss functions (keyword-only arrays in, scalar or per-example array out)."""

from ftjax.losses.bi_tuning import categorical_contrastive_loss, contrastive_cross_entropy, info_nce
from ftjax.losses.classification import softmax_cross_entropy
from ftjax.losses.co_tuning import co_tuning_loss
from ftjax.losses.regularizers import (batch_spectral_shrinkage, delta, delta_channel_weights,
                                       filter_ablation_loss_increase, l2_sp, lwf)

__all__ = [
    "batch_spectral_shrinkage",
    "categorical_contrastive_loss",
    "co_tuning_loss",
    "contrastive_cross_entropy",
    "delta",
    "delta_channel_weights",
    "filter_ablation_loss_increase",
    "info_nce",
    "l2_sp",
    "lwf",
    "softmax_cross_entropy",
]
