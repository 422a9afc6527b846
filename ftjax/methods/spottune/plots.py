"""SpotTune's figures: per-block usage (the paper's Fig. 3) and fine-tuned blocks per image (Fig. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ftjax.core.io import atomic_save

# ----------------------------------------------------------------------------- figures


def plot_block_usage(decisions: Any, path: str, *, block_names: Sequence[str] | None = None,
                     title: str = "") -> str:
  """Fig. 3: per routed block, the fraction of images routed through the fine-tuned copy.

  Args:
    decisions: ``[N, L]`` 0/1 decisions.
    path: PNG to write (directories are created).
    block_names: labels of the L blocks (default ``0..L-1``).
    title: figure title.

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  decisions = np.asarray(decisions, np.float64)
  if decisions.ndim != 2 or decisions.shape[0] == 0:
    raise ValueError(f"decisions must be [N > 0, L], got shape {decisions.shape}")
  usage = decisions.mean(axis=0)
  names = list(block_names) if block_names is not None else [str(i) for i in range(len(usage))]
  if len(names) != len(usage):
    raise ValueError(f"{len(names)} block names for {len(usage)} blocks")
  fig, (ax_map, ax_bar) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(usage)), 4.2),
                                       gridspec_kw={"height_ratios": [1, 3]}, sharex=True)
  image = ax_map.imshow(usage[None, :], cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto")
  ax_map.set_yticks([])
  fig.colorbar(image, ax=[ax_map, ax_bar], label="fraction fine-tuned")
  ax_bar.bar(np.arange(len(usage)), usage, color="tab:red")
  ax_bar.set_ylim(0.0, 1.0)
  ax_bar.set_ylabel("fraction of images")
  ax_bar.set_xticks(np.arange(len(usage)))
  ax_bar.set_xticklabels(names, rotation=90, fontsize=7)
  ax_map.set_title(title or f"SpotTune policy: fine-tuned block usage ({decisions.shape[0]} images)")
  return _save(fig, path)


def plot_finetuned_histogram(decisions: Any, path: str, *, title: str = "") -> str:
  """Fig. 4: histogram of the number of fine-tuned blocks per image.

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  decisions = np.asarray(decisions, np.float64)
  if decisions.ndim != 2 or decisions.shape[0] == 0:
    raise ValueError(f"decisions must be [N > 0, L], got shape {decisions.shape}")
  num_blocks = decisions.shape[1]
  counts = np.bincount(np.rint(decisions.sum(axis=1)).astype(np.int64), minlength=num_blocks + 1)
  fig, ax = plt.subplots(figsize=(6.0, 3.5))
  ax.bar(np.arange(num_blocks + 1), counts, color="tab:red")
  ax.set_xlabel("number of fine-tuned blocks")
  ax.set_ylabel("number of images")
  ax.set_xticks(np.arange(num_blocks + 1))
  ax.set_title(title or f"SpotTune: fine-tuned blocks per image ({decisions.shape[0]} images)")
  return _save(fig, path)


def _save(fig: Any, path: str) -> str:
  import matplotlib.pyplot as plt
  atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
  plt.close(fig)
  return path


__all__ = ["plot_block_usage", "plot_finetuned_histogram"]
