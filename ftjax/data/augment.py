"""Image transforms in TensorFlow graph ops (used inside tf.data maps).

Train: random resized crop (Inception-style, as torchvision's
``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))``) + horizontal flip, both
*stateless*: the randomness is a pure function of a ``[2]`` int64 seed, so the
pipeline output depends only on (config, seed, step). Eval: resize the shorter
side, then center crop. All transforms take a ``uint8`` or float ``[H, W, 3]``
image and return ``float32 [S, S, 3]`` raw pixels in ``[0, 255]``.

Example:
  >>> img = tf.zeros([28, 28, 3], tf.uint8)
  >>> train_transform(img, seed=tf.constant([0, 7], tf.int64), image_size=32).shape
  TensorShape([32, 32, 3])
"""

from __future__ import annotations

import math

import tensorflow as tf

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Crop candidates drawn at once; torchvision also tries 10 before its fallback.
_NUM_CROP_ATTEMPTS = 10


def default_resize_size(image_size: int) -> int:
  """Shorter-side size before the eval center crop: ``round(image_size / 0.875)``."""
  return int(round(image_size / 0.875))


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  # Bilinear with antialiasing (triangle filter when shrinking); weights are
  # non-negative, so the output stays in the input's [0, 255] range.
  return tf.image.resize(tf.cast(image, tf.float32), tf.stack([height, width]),
                         method="bilinear", antialias=True)


def random_crop_box(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, *,
                    scale: tuple[float, float] = DEFAULT_SCALE,
                    ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[tf.Tensor, ...]:
  """Samples an RandomResizedCrop box ``(top, left, crop_h, crop_w)`` statelessly.

  Area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of 10
  candidates that fits is used, else a center crop with the ratio clamped to
  ``ratio`` (torchvision's rule).
  """
  seed_area, seed_ratio, seed_pos = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w * tf.random.stateless_uniform(
      [_NUM_CROP_ATTEMPTS], seed_area, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [_NUM_CROP_ATTEMPTS], seed_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)

  # Fallback: whole image cropped to the nearest allowed aspect ratio, centered.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], width, tf.where(
      in_ratio > ratio[1], tf.cast(tf.round(h * ratio[1]), tf.int32), width))
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w / ratio[0]), tf.int32), height)
  fb_h = tf.minimum(fb_h, height)
  fb_w = tf.minimum(fb_w, width)

  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  any_fits = tf.reduce_any(fits)
  crop_h = tf.where(any_fits, crop_h[first], fb_h)
  crop_w = tf.where(any_fits, crop_w[first], fb_w)
  # Uniform offsets in [0, H - h] x [0, W - w] (fallback: centered).
  unit = tf.random.stateless_uniform([2], seed_pos)
  top = tf.cast(tf.floor(unit[0] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(unit[1] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
  top = tf.where(any_fits, tf.minimum(top, height - crop_h), (height - crop_h) // 2)
  left = tf.where(any_fits, tf.minimum(left, width - crop_w), (width - crop_w) // 2)
  return top, left, crop_h, crop_w


def train_transform(image: tf.Tensor, *, seed: tf.Tensor, image_size: int,
                    scale: tuple[float, float] = DEFAULT_SCALE,
                    ratio: tuple[float, float] = DEFAULT_RATIO) -> tf.Tensor:
  """Random resized crop to ``image_size`` + random horizontal flip (stateless).

  Args:
    image: ``[H, W, 3]`` image.
    seed: ``[2]`` int64 stateless seed; equal seeds give equal outputs.
    image_size: output side S.
    scale: range of the crop's area fraction.
    ratio: range of the crop's aspect ratio (width / height).

  Returns:
    ``float32 [S, S, 3]`` in ``[0, 255]``.
  """
  seed_crop, seed_flip = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  shape = tf.shape(image)
  top, left, crop_h, crop_w = random_crop_box(shape[0], shape[1], seed_crop,
                                              scale=scale, ratio=ratio)
  crop = image[top:top + crop_h, left:left + crop_w]
  out = _resize(crop, image_size, image_size)
  flip = tf.random.stateless_uniform([], seed_flip) < 0.5
  out = tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)
  return tf.clip_by_value(tf.ensure_shape(out, [image_size, image_size, 3]), 0.0, 255.0)


def eval_transform(image: tf.Tensor, *, image_size: int,
                   resize_size: int | None = None) -> tf.Tensor:
  """Resizes the shorter side to ``resize_size`` then center crops ``image_size``.

  Args:
    image: ``[H, W, 3]`` image.
    image_size: output side S.
    resize_size: shorter side after resizing (default ``round(S / 0.875)``);
      must be ``>= image_size``.

  Returns:
    ``float32 [S, S, 3]`` in ``[0, 255]``.
  """
  resize_size = default_resize_size(image_size) if resize_size is None else resize_size
  if resize_size < image_size:
    raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  short = tf.minimum(h, w)
  new_h = tf.maximum(tf.cast(tf.round(h * resize_size / short), tf.int32), resize_size)
  new_w = tf.maximum(tf.cast(tf.round(w * resize_size / short), tf.int32), resize_size)
  out = _resize(image, new_h, new_w)
  top = (new_h - image_size) // 2
  left = (new_w - image_size) // 2
  out = out[top:top + image_size, left:left + image_size]
  return tf.clip_by_value(tf.ensure_shape(out, [image_size, image_size, 3]), 0.0, 255.0)


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Decodes PNG/JPEG/BMP/GIF bytes to ``uint8 [H, W, 3]`` (grayscale replicated)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])
