"""Linen models, torch weight import and the pretrained registry.

Example:
  >>> model = create_model("resnet_tiny", num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False,
  ...                        outputs=model.all_outputs)
  >>> out = model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False,
  ...                   outputs=("features", "logits"))
  >>> out["logits"].shape
  (2, 10)
"""

from __future__ import annotations

from ftjax.models.efficientnet_lite import EFFICIENTNET_SPECS, LITE_MEAN, LITE_STD, EfficientNetBackbone
from ftjax.models.factory import MODEL_NAMES, block_prefixes, create_model, num_features
from ftjax.models.layers import OUTPUT_NAMES, Conv, ImageClassifier
from ftjax.models.registry import Prediction, Preprocessing, Pretrained, preprocess_images, pretrained
from ftjax.models.resnet import IMAGENET_MEAN, IMAGENET_STD, RESNET_SPECS, ResNetBackbone

__all__ = [
    "EFFICIENTNET_SPECS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "RESNET_SPECS",
    "Conv",
    "EfficientNetBackbone",
    "ResNetBackbone",
    "ImageClassifier",
    "MODEL_NAMES",
    "OUTPUT_NAMES",
    "Prediction",
    "Preprocessing",
    "Pretrained",
    "block_prefixes",
    "create_model",
    "num_features",
    "preprocess_images",
    "pretrained",
]
