"""`jaxsys launch`: run a jaxsys command as N local processes of one JAX job.

Each child gets the `JAXSYS_*` variables of `jaxsys.parallel.runtime` (process i of N, the
coordinator on a free local port) and joins the others there; the mesh spans all their devices.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Sequence

from jaxsys.parallel.runtime import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (bind to port 0, read it, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGKILL this child if the launcher dies (even by kill -9), so no orphan keeps
    training; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def is_noise(line: str) -> bool:
    """Gloo's per-rank connection report (one line per process per collective group: 24 lines
    for a 2-process run), the only child output the launcher drops."""
    return line.startswith("[Gloo] Rank ") and " is connected to " in line


def _pump(pid: int, stream: IO[str], out: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        if is_noise(line):
            continue
        with lock:
            out.write(f"[{pid}] {line}" if line.endswith("\n") else f"[{pid}] {line}\n")
            out.flush()


def launch(num_processes: int, command: Sequence[str], grace_seconds: float = 10.0,
           out: IO[str] | None = None) -> int:
    """Run `command` as `num_processes` local processes of one distributed job; return the exit code.

    Every child gets the JAXSYS_* variables (process i of N, coordinator on a free local port)
    and its own session, so a Ctrl-C at the terminal reaches the children once, through us.
    Child output is printed line by line prefixed with ``[i]`` (without Gloo's connection
    reports, `is_noise`). SIGTERM/SIGINT are forwarded
    to every child (the training loop saves and exits 0). When a child exits non-zero the others
    are stopped (SIGTERM, then SIGKILL after `grace_seconds`) and its code is returned with a
    message naming it."""
    if num_processes < 1:
        raise ValueError(f"--processes must be ≥ 1, got {num_processes}.")
    out = out or sys.stdout
    port = free_port()
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        for i in range(num_processes):
            env = {**os.environ, ENV_COORDINATOR: f"127.0.0.1:{port}",
                   ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(i)}
            child = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True, preexec_fn=_die_with_parent)
            children.append(child)
            pump = threading.Thread(target=_pump, args=(i, child.stdout, out, lock), daemon=True)
            pump.start()
            pumps.append(pump)
        failed: tuple[int, int] | None = None
        while failed is None and any(c.poll() is None for c in children):
            for i, c in enumerate(children):
                if c.poll() not in (None, 0):
                    failed = (i, c.returncode)
                    break
            time.sleep(0.05)
        if failed is None:
            failed = next(((i, c.returncode) for i, c in enumerate(children) if c.returncode), None)
        if failed is not None:
            _stop(children, grace_seconds)
        for pump in pumps:
            pump.join(timeout=5)
        if failed is not None:
            i, code = failed
            what = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
            with lock:
                print(f"jaxsys launch: process {i} of {num_processes} failed (exit {what}); "
                      "stopped the others.", file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code
        return 0
    finally:
        _stop(children, grace_seconds=0.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM every live child, wait up to `grace_seconds`, then SIGKILL what is left."""
    live = [c for c in children if c.poll() is None]
    if grace_seconds > 0:
        for c in live:
            c.terminate()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(c.poll() is None for c in live):
            time.sleep(0.05)
    for c in live:
        if c.poll() is None:
            c.kill()
            c.wait(timeout=10)
