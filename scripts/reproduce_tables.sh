#!/usr/bin/env bash
# Regenerates every results table, figure and the scorecard from scratch (issue 24):
#   bash scripts/reproduce_tables.sh [WORKERS]
# Resumable: stop it at any point and run it again; a finished run is never rerun
# (the evidence runner's ledger, experiments/results/ledger.jsonl, and the data reuse
# study's run directories say what is done). Run it from a clean checkout of a fixed
# commit (e.g. `git worktree add ../ftjax-study <commit>`) so that other work landing
# meanwhile does not change the code under the runs; RESULTS points at the checkout
# whose experiments/results receive the ledger and the tables (default: this one).
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${1:-$(nproc)}"
results="${RESULTS:-$PWD/experiments/results}"
runs="${RUNS:-$PWD/runs}"
py=.venv/bin/python

# 1. Every paper table: sweeps on validation (seed 0), then 3 seeds at the chosen values.
$py -m experiments.evidence run --workers "$workers" --results "$results" --runs "$runs/evidence"

# 2. Pre-training data reuse (design 'near', 3 seeds).
$py -m experiments.data_reuse --config experiments/configs/data_reuse.py --config.progress=False \
    --workdir "$runs/data_reuse_near"
mkdir -p "$results/data_reuse_near"
cp "$runs"/data_reuse_near/{results.json,results_table.md} "$runs"/data_reuse_near/uot_top_k_*.png \
   "$results/data_reuse_near/"

# 3. Tables, figures and the scorecard (experiments/results/README.md) from the ledger.
$py -m experiments.evidence tables --results "$results"
