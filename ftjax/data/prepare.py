"""``python -m ftjax.data.prepare NAME [--data_dir DIR]``: build a dataset offline, once."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("names", nargs="+", help="TFDS dataset names, e.g. fashion_mnist")
  parser.add_argument("--data_dir", default=None, help="TFDS data directory (default: TFDS's own)")
  args = parser.parse_args(argv)
  from ftjax import data
  for name in args.names:
    try:
      data.prepare_offline(name, data_dir=args.data_dir)
    except (ValueError, FileNotFoundError) as e:
      print(f"ftjax: error: {e}", file=sys.stderr)
      return 2
    print(f"[prepare] {name}: ready")
  return 0


if __name__ == "__main__":
  sys.exit(main())
