"""Rate of the train input pipeline alone: images/s per CPU core and in total.

The pipeline is :meth:`ftjax.data.ImageDataset.train_batches` (decode, Inception-style
random-resized crop to ``--image-size`` and horizontal flip, batching, tf.data
prefetch), read from a TFDS dataset with no model behind it. Each point runs in its
own process pinned to the first ``n`` CPU cores (``os.sched_setaffinity``, as
``taskset`` would) with ``FTJAX_TF_DATA_THREADS=n`` (the tf.data thread pool), so the
figure per core is what one core of the host gives a trainer. After ``--warmup``
batches it counts images for ``--seconds`` seconds twice: the host batches alone, and
the same batches through :func:`ftjax.data.pipeline.prefetch_to_device` (two batches in
flight, ``jax.device_put``; on a CPU-only machine the "device" is host memory, so that
column only checks that the double buffer costs nothing).

Dividing a target step rate by the per-core figure gives the cores a run needs:
``cores = steps/s x batch size / (images/s per core)`` (see experiments/bench/README.md).

Usage::

  python -m experiments.bench.input_pipeline                           # 1, 2, 4 ... cores
  python -m experiments.bench.input_pipeline --cores 1,2 --seconds 15 --dataset fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_RESULT = "pipeline_result="


def _worker(args: argparse.Namespace) -> None:
  """One point: this process on ``args.worker`` cores; prints a JSON result line."""
  cores = args.worker
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  os.environ["FTJAX_TF_DATA_THREADS"] = str(cores)
  import jax
  from ftjax import data
  from ftjax.data.pipeline import prefetch_to_device

  data.prepare_offline(args.dataset, data_dir=args.data_dir or None)
  dataset = data.load_dataset(args.dataset, data_dir=args.data_dir or None, sampling_rate=100.0, seed=0,
                              image_size=args.image_size)

  def rate(batches, consume) -> float:
    for _ in range(args.warmup):
      consume(next(batches))
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
      images += len(consume(next(batches))["label"])
    return images / (time.perf_counter() - t0)

  host = rate(dataset.train_batches(batch_size=args.batch), lambda b: b)

  def on_device(batch):
    jax.block_until_ready(batch)
    return batch

  device = rate(prefetch_to_device(dataset.train_batches(batch_size=args.batch, start_step=10_000),
                                   put=jax.device_put, size=2), on_device)
  print(_RESULT + json.dumps({"cores": cores, "host": host, "device": device,
                              "device_kind": jax.devices()[0].device_kind}), flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", default="fashion_mnist", help="a TFDS name (prepared offline here)")
  parser.add_argument("--data-dir", default="", help="TFDS data dir ('' = TFDS's default)")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=64)
  available = len(os.sched_getaffinity(0))
  default_cores = sorted({min(2**i, available) for i in range(8) if 2**i <= available} | {available})
  parser.add_argument("--cores", default=",".join(map(str, default_cores)),
                      help="comma-separated core counts (default: powers of 2 up to the cores available)")
  parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per point and mode")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
  parser.add_argument("--label", default="", help="printed with the table (e.g. 'measured under load')")
  parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args)
    return []
  cores = [int(c) for c in args.cores.split(",") if c]
  if not cores or min(cores) < 1 or max(cores) > available:
    parser.error(f"--cores must be between 1 and the {available} cores available, got {args.cores!r}")
  results = []
  for n in cores:
    cmd = [sys.executable, "-m", "experiments.bench.input_pipeline", "--worker", str(n),
           "--dataset", args.dataset, "--data-dir", args.data_dir, "--image-size", str(args.image_size),
           "--batch", str(args.batch), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode or not lines:
      raise SystemExit(f"input_pipeline worker on {n} cores failed ({proc.returncode}):\n"
                       f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.stdout}")
    result = json.loads(lines[-1][len(_RESULT):])
    results.append(result)
    print(f"  {n} core(s): {result['host']:.0f} images/s host, {result['device']:.0f} with device prefetch",
          flush=True)
  load = os.getloadavg()[0]
  print(f"\n{args.dataset}, {args.image_size} px random-resized crop + flip, batch {args.batch}"
        f"{', ' + args.label if args.label else ''} (1-min load average at the end: {load:.1f})")
  print("| cores | images/s | images/s per core | with device prefetch (2 in flight) |")
  print("|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['cores']} | {r['host']:.0f} | {r['host'] / r['cores']:.0f} | {r['device']:.0f} |")
  return results


if __name__ == "__main__":
  main()
