"""Offline TFDS builders: datasets prepared from local files, no network.

Fashion-MNIST is built from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist/*.gz``). The builder subclasses TFDS's own
``FashionMNIST`` builder, keeps its name, version, features and
``_generate_examples`` (same keys, hence the same example order on disk), and only
replaces where the IDX files come from. Afterwards the plain registered builder
reads it:

>>> prepare_offline("fashion_mnist", data_dir="/tmp/tfds")
>>> ds = tfds.builder("fashion_mnist", data_dir="/tmp/tfds").as_dataset(split="test")
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

# Where the Debian package puts the files; overridable for unusual installs.
FASHION_MNIST_DIR_ENV = "FTJAX_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Split sizes of Fashion-MNIST (the same as TFDS's builder uses).
_NUM_TRAIN, _NUM_TEST = 60_000, 10_000


def fashion_mnist_source_dir() -> str:
  """Directory holding the Debian Fashion-MNIST gzip files."""
  return os.environ.get(FASHION_MNIST_DIR_ENV, DEFAULT_FASHION_MNIST_DIR)


def fashion_mnist_source_files(source_dir: str | None = None) -> dict[str, str]:
  """Paths of the four Debian Fashion-MNIST gzip files; clear error if missing."""
  source_dir = source_dir or fashion_mnist_source_dir()
  paths = {k: os.path.join(source_dir, f) for k, f in FASHION_MNIST_FILES.items()}
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files not found: {missing}; install them with "
        "`apt-get install dataset-fashion-mnist` (or set "
        f"{FASHION_MNIST_DIR_ENV} to a directory holding {sorted(FASHION_MNIST_FILES.values())})")
  return paths


class DebianFashionMNIST(tfds_mnist.FashionMNIST, skip_registration=True):
  """TFDS ``fashion_mnist`` built from the Debian gzip files instead of the web."""

  # Same name as the registered builder so the prepared directory is
  # ``<data_dir>/fashion_mnist/<version>`` and ``tfds.builder`` finds it.
  name = "fashion_mnist"
  # No checksums file: nothing is downloaded. (Also avoids TFDS's code-path probe,
  # which needs the optional `importlib_resources` package for non-TFDS modules.)
  code_path = None

  def __init__(self, *, unpacked_files: dict[str, str], **kwargs):
    self._unpacked_files = unpacked_files
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = self._unpacked_files
    return [
        tfds.core.SplitGenerator(
            name=tfds.Split.TRAIN,
            gen_kwargs=dict(num_examples=_NUM_TRAIN, data_path=files["train_data"],
                            label_path=files["train_labels"])),
        tfds.core.SplitGenerator(
            name=tfds.Split.TEST,
            gen_kwargs=dict(num_examples=_NUM_TEST, data_path=files["test_data"],
                            label_path=files["test_labels"])),
    ]


def _gunzip_all(paths: dict[str, str], out_dir: str) -> dict[str, str]:
  unpacked = {}
  for key, path in paths.items():
    target = os.path.join(out_dir, os.path.basename(path)[: -len(".gz")])
    with gzip.open(path, "rb") as src, open(target, "wb") as dst:
      shutil.copyfileobj(src, dst)
    unpacked[key] = target
  return unpacked


def _prepare_fashion_mnist(data_dir: str | None) -> None:
  # The registered builder tells whether this version is already prepared.
  if tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared():
    return
  paths = fashion_mnist_source_files()
  root = data_dir or tfds.core.constants.DATA_DIR
  os.makedirs(root, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix="ftjax_fashion_mnist_") as tmp:
    builder = DebianFashionMNIST(unpacked_files=_gunzip_all(paths, tmp), data_dir=data_dir)
    # TFDS prints "Downloading and preparing ..." / "... Subsequent calls will reuse this
    # data." on stdout; nothing is downloaded here, so those lines go to the INFO log
    # (--verbosity=0), keeping the default console to ftjax's own lines.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      builder.download_and_prepare(
          download_dir=os.path.join(tmp, "downloads"),
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    for line in printed.getvalue().splitlines():
      if line.strip():
        logging.info("tfds: %s", line.strip())


# Dataset name -> function(data_dir) that prepares it from local files.
_OFFLINE_BUILDERS = {"fashion_mnist": _prepare_fashion_mnist}


def offline_names() -> list[str]:
  """Names of datasets that ``prepare_offline`` can build without network."""
  return sorted(_OFFLINE_BUILDERS)


def prepare_offline(name: str, *, data_dir: str | None = None) -> None:
  """Prepares a TFDS dataset from local files if ftjax knows how; else no-op.

  For ``"fashion_mnist"`` (optionally ``"fashion_mnist:3.0.1"``) this writes TFDS's
  own ``fashion_mnist`` (same name, version, features and examples) from the
  Debian package files, once; later calls return immediately. Other names are left
  to TFDS (they must already be prepared in ``data_dir``).

  Args:
    name: TFDS dataset name.
    data_dir: TFDS data directory (default: TFDS's default).

  Raises:
    FileNotFoundError: the Debian files are missing (names the package).
  """
  base = name.split(":")[0].split("/")[0]
  prepare = _OFFLINE_BUILDERS.get(base)
  if prepare is not None:
    prepare(data_dir)
