r"""Starts N cooperating processes of an experiment on this host (CPU devices, gloo collectives).

  .venv/bin/python -m experiments.launch_local --num_processes 2 --devices_per_process 2 -- \
      -m experiments.train --config experiments/configs/tiny.py --workdir runs/tiny_mp

Everything after ``--`` is the Python command line each process runs unchanged;
the launcher only sets ``JAX_COORDINATOR_ADDRESS`` (a free local port),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and
``XLA_FLAGS=--xla_force_host_platform_device_count=D``, and
``experiments.train`` joins them through ``jax.distributed.initialize``. This is
for testing multi-process code on one machine; on a GPU cluster or a TPU pod
slice, start the same command once per host instead (see the README).

Process 0's output is shown; every process's output also goes to
``--log_dir/process_<i>.log`` (and their pids to ``--log_dir/pids.txt``). If any process dies or fails, the launcher stops
the others (SIGTERM, then SIGKILL after ``--grace`` seconds) and exits with an
error naming it: a run never hangs on a dead peer. Restarting the same command
resumes from the last checkpoint.

SIGTERM or SIGINT (Ctrl-C) to the launcher is passed on to every process as
SIGTERM (the processes run in their own session, so a terminal's Ctrl-C reaches
the launcher alone): JAX's preemption service makes them agree on a step, they
write a checkpoint there and exit with status 143 (``128 + SIGTERM``), and the
launcher exits with that status and a line saying the same command resumes. A
second signal stops them at once. The processes share one job id
(``FTJAX_JOB_ID``), which the workdir lock names.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with status {code}"


# Exit statuses of a process that stopped on a signal after writing its checkpoint
# (ftjax.train.preemption.Preempted.exit_code: 128 + SIGTERM or SIGINT).
PREEMPTED_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT)


def launch(command: list[str], *, num_processes: int, devices_per_process: int, log_dir: str,
           timeout: float | None = None, grace: float = 10.0, preempt_grace: float = 300.0) -> int:
  """Runs ``python COMMAND`` as ``num_processes`` processes; returns 0 when all succeed.

  Returns ``128 + signal`` when the run was preempted (a signal to the launcher or
  to a process) and every process stopped after its checkpoint, 1 when a process
  failed. ``preempt_grace``: seconds the processes get to reach the agreed step
  and write the checkpoint before they are killed.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes and devices_per_process must be >= 1, got "
                     f"{num_processes}, {devices_per_process}")
  if not command:
    raise ValueError("no command given: put the python arguments after '--'")
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{free_port()}"
  job = os.environ.get("FTJAX_JOB_ID") or f"launch_local:{socket.gethostname()}:{os.getpid()}"
  procs, logs = [], []
  received: list[int] = []

  def forward(signum, frame):
    del frame
    received.append(signum)
    for p in procs:
      if p.poll() is None:
        # A second signal stops at once; the first asks for a checkpoint (SIGTERM: the
        # signal JAX's preemption service listens for).
        p.send_signal(signal.SIGKILL if len(received) > 1 else signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    for i in range(num_processes):
      env = dict(os.environ)
      env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
                 JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", FTJAX_JOB_ID=job,
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
      log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
      logs.append(log)
      out = None if i == 0 else log  # process 0 streams to this terminal
      procs.append(subprocess.Popen([sys.executable, *command], env=env, stdout=out,
                                    stderr=subprocess.STDOUT if out else None, start_new_session=True))
    with open(os.path.join(log_dir, "pids.txt"), "w") as f:  # for tools and tests that watch the run
      f.write("\n".join(str(p.pid) for p in procs) + "\n")
    return _supervise(procs, received, num_processes=num_processes, log_dir=log_dir, timeout=timeout,
                      grace=grace, preempt_grace=preempt_grace)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in procs:  # never leave a process behind (an exception, a second signal)
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()


def _supervise(procs: list[subprocess.Popen], received: list[int], *, num_processes: int, log_dir: str,
               timeout: float | None, grace: float, preempt_grace: float) -> int:
  start = time.monotonic()
  preempted_since = None
  failed = None
  while True:
    codes = [p.poll() for p in procs]
    if preempted_since is None and (received or any(c in PREEMPTED_CODES for c in codes)):
      preempted_since = time.monotonic()  # the others are reaching the agreed step: let them save
    bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0) and not (
        preempted_since is not None and c in PREEMPTED_CODES)]
    if bad:
      failed = bad[0]
      break
    if all(c is not None for c in codes):
      if preempted_since is None or all(c == 0 for c in codes):
        return 0
      code = next(c for c in codes if c in PREEMPTED_CODES)
      print(f"ftjax: preempted: the {num_processes} processes wrote a checkpoint and stopped "
            f"(logs in {log_dir}); the same command resumes from it", file=sys.stderr, flush=True)
      return code
    if preempted_since is not None and time.monotonic() - preempted_since > preempt_grace:
      failed = (-2, None)
      break
    if preempted_since is None and timeout is not None and time.monotonic() - start > timeout:
      failed = (-1, None)
      break
    time.sleep(0.2)
  _stop(procs, grace)
  i, code = failed
  if i == -1:
    print(f"ftjax: error: the {num_processes} processes did not finish within {timeout:g} s; "
          f"stopped them", file=sys.stderr)
  elif i == -2:
    print(f"ftjax: error: the processes did not stop within {preempt_grace:g} s of the preemption "
          f"signal; killed them (logs in {log_dir}). The same command resumes from the last checkpoint.",
          file=sys.stderr)
  else:
    print(f"ftjax: error: process {i} of {num_processes} {_describe(code)}; stopped the others "
          f"(logs in {log_dir}). Run the same command again to resume from the last checkpoint.",
          file=sys.stderr)
  return 1


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--log_dir", default="launch_logs")
  parser.add_argument("--timeout", type=float, default=None, help="seconds for the whole run")
  parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
  parser.add_argument("--preempt_grace", type=float, default=300.0,
                      help="seconds the processes get to checkpoint after a preemption signal")
  args = parser.parse_args(own)
  try:
    code = launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  log_dir=args.log_dir, timeout=args.timeout, grace=args.grace,
                  preempt_grace=args.preempt_grace)
  except ValueError as e:
    print(f"ftjax: error: {e}", file=sys.stderr)
    code = 2
  sys.exit(code)


if __name__ == "__main__":
  main()
