r"""One results table from several comparisons run on the same protocol.

  .venv/bin/python -m experiments.combine_tables --out runs/table_5 --title "Fashion-MNIST 5%" \
      runs/co_tuning_5 runs/regularizers_5

Reads each workdir's ``results.json``, keeps shared rows (e.g. ``finetune``) once
when they agree, and writes ``results_table.md`` and ``results.json`` into ``--out``.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from ftjax.train import report

_OUT = flags.DEFINE_string("out", None, "directory for the combined table", required=True)
_TITLE = flags.DEFINE_string("title", "", "first line of the table")


def main(argv: list[str]) -> None:
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("name at least one comparison workdir")
  results = report.combine_results(workdirs)
  os.makedirs(_OUT.value, exist_ok=True)
  print(report.write_table(results, _OUT.value, title=_TITLE.value))


if __name__ == "__main__":
  app.run(main)
