"""One pass of a jitted function over evaluation batches, padding rows dropped.

Evaluation batches (``dataset.eval_batches(split, batch_size=...)``) are padded to
a fixed size and carry ``mask`` (0 = padding); every caller that runs a model over
a split (source predictions, features, routing decisions) keeps the real rows and
concatenates them. :func:`collect` is that loop, once.

Example:
  >>> import numpy as np
  >>> batches = [{"image": np.ones((2, 3)), "label": np.array([1, 0]), "mask": np.array([1, 0])}]
  >>> out, labels = collect(lambda batch, i: {"sum": batch["image"].sum(-1)}, batches)
  >>> out["sum"].tolist(), labels.tolist()
  ([3.0], [1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def collect(fn: Callable[[dict[str, Any], int], dict[str, Any]], batches: Iterable[dict[str, Any]], *,
            total: int | None = None, progress: bool = False, description: str = "",
            gather: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """``({name: [N, ...]}, labels [N])``: ``fn(batch, batch_index)``'s arrays over all real rows.

  Args:
    fn: returns a dict of ``[batch, ...]`` arrays for one batch (jit it yourself).
    batches: dicts with ``label`` and optionally ``mask`` (0 = padding, dropped).
    total: number of batches, for the progress bar.
    progress: show a tqdm progress bar.
    description: its label.
    gather: with several processes, gather every process's rows first (all
      processes must yield the same number of batches), so each gets all rows.

  Raises:
    ValueError: no batch at all.
  """
  iterator, bar = batches, None
  if progress:
    from tqdm.auto import tqdm
    iterator = bar = tqdm(batches, total=total, desc=description, unit="batch", dynamic_ncols=True)
  outputs: dict[str, list[np.ndarray]] = {}
  labels, masks = [], []
  try:
    for i, batch in enumerate(iterator):
      for name, value in fn(batch, i).items():
        outputs.setdefault(name, []).append(np.asarray(value))
      labels.append(np.asarray(batch["label"]))
      masks.append(np.asarray(batch["mask"]) if "mask" in batch else np.ones(len(batch["label"]), np.int32))
  finally:
    if bar is not None:
      bar.close()
  if not labels:
    raise ValueError(f"no batches{' for ' + description if description else ''}")
  out = {name: np.concatenate(chunks) for name, chunks in outputs.items()}
  label_array, mask_array = np.concatenate(labels), np.concatenate(masks)
  if gather:
    import jax
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      # Every process yields the same number of (padded) batches, so shapes agree.
      out = {name: np.concatenate(list(multihost_utils.process_allgather(a))) for name, a in out.items()}
      label_array, mask_array = (np.concatenate(list(multihost_utils.process_allgather(a)))
                                 for a in (label_array, mask_array))
  keep = mask_array > 0
  return {name: a[keep] for name, a in out.items()}, label_array[keep]
