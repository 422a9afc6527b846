"""Array ops behind ftjax's layers: plain functions, ``jax.custom_vjp`` rules and XLA FFI
calls into CPU kernels, each kernel's C++ (``*.cc``) beside its Python wrapper.

* :mod:`ftjax.ops.geometry`: padding, output size and taps of a window op.
* :mod:`ftjax.ops.conv`: :func:`~ftjax.ops.conv.conv2d` and its formulations
  (oneDNN, XLA, matmul, shifted), chosen per platform and shape; ``conv_impl`` /
  ``FTJAX_CONV_IMPL`` force one.
* :mod:`ftjax.ops.onednn_conv` (``onednn_conv.cc``): oneDNN convolutions and their
  gradients as FFI calls.
* :mod:`ftjax.ops.pool` (``max_pool.cc``): max pooling with fast gradients.
* :mod:`ftjax.ops.channel_sums` (``channel_sums.cc``): BatchNorm's per-channel sums.
* :mod:`ftjax.ops.batch_norm`: training-mode batch normalisation with a hand-written
  gradient.
* :mod:`ftjax.ops.native`: loading the kernels ``scripts/build_native.sh`` builds into
  ``ftjax/ops/_build/``.

The Linen modules built on these (``Conv``, ``BatchNorm``) are in
:mod:`ftjax.models.layers`. This package imports nothing else from ftjax.
"""
