"""Pure loss functions (keyword-only arrays in, scalar or per-example array out)."""

from ftjax.losses.classification import softmax_cross_entropy
from ftjax.losses.co_tuning import co_tuning_loss
from ftjax.losses.regularizers import (batch_spectral_shrinkage, delta, delta_channel_weights,
                                       filter_ablation_loss_increase, l2_sp, lwf)

__all__ = [
    "batch_spectral_shrinkage",
    "co_tuning_loss",
    "delta",
    "delta_channel_weights",
    "filter_ablation_loss_increase",
    "l2_sp",
    "lwf",
    "softmax_cross_entropy",
]
