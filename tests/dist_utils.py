"""Launch a function on several CPU ranks (gloo) and collect what each rank returns.

``run_ranks(fn, num_ranks, *args)`` spawns ``num_ranks`` fresh Python processes, joins them into one
gloo process group over a free loopback port, calls ``fn(rank, num_ranks, group, *args)`` on each and
returns the per-rank return values. A rank that raises, dies or hangs turns into an ``AssertionError``
in the parent that carries every failing rank's traceback; stragglers are killed, so a test never
hangs past ``timeout_s``.

Spawning is expensive (every process imports torch: about 10 s for 8 ranks on a 2-core machine), so
tests batch many cases into one ``run_ranks`` call.
"""

import contextlib
import os
import pickle
import queue as queue_module
import random
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_ranks", "make_seed", "free_port"]

# Seconds the parent still waits for the other ranks once one rank has failed: a failure usually
# leaves the others blocked in a collective, and their own timeout messages are useful context.
_GRACE_AFTER_FAILURE_S = 20.0
# Engine-side timeout given to every rank (`DEEP_EP_TIMEOUT_S`), far below the launcher's own.
_DEFAULT_ENGINE_TIMEOUT_S = "60"

_environ_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0 and ask)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_seed() -> int:
    """A fresh random seed, printed so that a failure can be replayed.

    Set the environment variable ``DEEP_EP_TEST_SEED`` to replay a printed seed.
    """
    replay = os.environ.get("DEEP_EP_TEST_SEED")
    if replay:
        seed = int(replay)
        print(f"[deep_ep tests] replaying seed {seed} (from DEEP_EP_TEST_SEED)")
    else:
        seed = random.SystemRandom().randrange(1 << 31)
        print(f"[deep_ep tests] seed {seed} (replay with DEEP_EP_TEST_SEED={seed})")
    return seed


def _rank_env(ranks_per_node: Optional[int], env: Optional[Dict[str, str]]) -> Dict[str, str]:
    values = {
        "DEEP_EP_TIMEOUT_S": _DEFAULT_ENGINE_TIMEOUT_S,
        # gloo resolves the hostname to pick an interface; pin it to loopback.
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    if ranks_per_node is not None:
        values["DEEP_EP_RANKS_PER_NODE"] = str(ranks_per_node)
    if env:
        values.update({key: str(value) for key, value in env.items()})
    return values


@contextlib.contextmanager
def _patched_environ(values: Dict[str, str]):
    """Set `values` in os.environ for the duration (spawned children inherit it at start())."""
    with _environ_lock:
        saved = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def _worker(rank: int, num_ranks: int, port: int, listener, env: Dict[str, str], fn: Callable, args: tuple,
            result_queue, timeout_s: float) -> None:
    # The environment was already inherited at spawn; set it again in case fn's module changed it.
    os.environ.update(env)
    try:
        torch.set_num_threads(1)
        from deep_ep._comm import loopback_store  # torch's tcp:// init method would listen on every interface
        dist.init_process_group("gloo", store=loopback_store(port, rank, num_ranks, timeout_s, listener), rank=rank,
                                world_size=num_ranks, timeout=timedelta(seconds=timeout_s))
        group = dist.new_group(list(range(num_ranks)))
        value = fn(rank, num_ranks, group, *args)
        result_queue.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt/SystemExit
        result_queue.put((rank, False, traceback.format_exc()))
    finally:
        # Report first: tearing down can block while a peer is still busy or hung.
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def run_ranks(fn: Callable, num_ranks: int, *args: Any, ranks_per_node: Optional[int] = None,
              timeout_s: float = 240, env: Optional[Dict[str, str]] = None, check_exit: bool = False) -> List[Any]:
    """Run ``fn(rank, num_ranks, group, *args)`` on `num_ranks` spawned processes.

    Args:
        fn: a module-level (picklable) function; its return value must be picklable.
        num_ranks: number of processes (world size).
        *args: extra picklable arguments passed to every rank.
        ranks_per_node: when given, exported as ``DEEP_EP_RANKS_PER_NODE`` (multi-node layouts on one box).
        timeout_s: wall-clock limit for the whole run; stragglers are killed after it.
        env: extra environment variables for the ranks.
        check_exit: also fail when a rank that reported does not exit by itself with code 0 within 5 s.

    Returns:
        ``[fn's return value on rank 0, on rank 1, ...]``.

    Raises:
        AssertionError: with the traceback of every rank that raised, died or timed out.
    """
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this function's source
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    rank_env = _rank_env(ranks_per_node, env)
    # gloo's own collective timeout: below ours, so that a blocked rank reports instead of being killed.
    gloo_timeout_s = max(10.0, timeout_s - 30.0)

    # Rank 0 gets the store's socket already listening (no window for another process to take the port).
    from deep_ep._comm import start_loopback_ranks
    with _patched_environ(rank_env):
        processes = start_loopback_ranks(ctx, _worker, num_ranks, rank_env, fn, args, result_queue, gloo_timeout_s,
                                         name="deep_ep-test-rank{rank}", daemon=True)

    results: Dict[int, Any] = {}
    failures: Dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    exited_at: Dict[int, float] = {}
    try:
        while len(results) + len(failures) < num_ranks:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, payload = result_queue.get(timeout=min(0.5, deadline - now))
            except queue_module.Empty:
                # A process that exited without reporting (segfault, os._exit) is a failure; give its
                # queue message a moment to arrive first, since put() is asynchronous.
                for rank, process in enumerate(processes):
                    if rank in results or rank in failures or process.exitcode is None:
                        continue
                    first_seen = exited_at.setdefault(rank, now)
                    if now - first_seen > 5.0:
                        failures[rank] = f"process exited with code {process.exitcode} without reporting a result"
                        deadline = min(deadline, now + _GRACE_AFTER_FAILURE_S)
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    finally:
        for process in processes:
            process.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) if not failures else 0.5)
        for rank, process in enumerate(processes):
            if check_exit and rank in results and process.is_alive():
                process.join(timeout=5)
                if process.is_alive():
                    failures[rank] = "reported its result but did not exit by itself within 5 s (killed)"
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
                if rank not in results and rank not in failures:
                    failures[rank] = f"killed: no result after the time limit ({timeout_s:.0f} s, or "\
                                     f"{_GRACE_AFTER_FAILURE_S:.0f} s after another rank failed)"
        for rank in range(num_ranks):
            if rank not in results and rank not in failures:
                failures[rank] = f"no result (exit code {processes[rank].exitcode})"
            elif check_exit and rank not in failures and processes[rank].exitcode != 0:
                failures[rank] = f"reported its result, then exited with code {processes[rank].exitcode}"
        result_queue.close()

    if failures:
        report = [f"{len(failures)} of {num_ranks} ranks failed in {getattr(fn, '__name__', fn)!r}:"]
        for rank in sorted(failures):
            report.append(f"----- rank {rank} -----\n{failures[rank].rstrip()}")
        raise AssertionError("\n".join(report))
    return [results[rank] for rank in range(num_ranks)]
