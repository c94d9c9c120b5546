"""Compiles started ahead of the launch that needs them, on worker threads.

A training call's first forward of a new variant compiles the forward kernel, and its backward compiles the dQ and
dK/dV kernels: three compiles of about a second each, one after the other. launch._compile_backward_ahead starts the
two backward ones here while the forward compiles and runs, so the first step waits for the slowest compile rather
than for their sum (on a 2-core CPU the three compile 1.5-1.7x faster on three threads than one after the other:
tools/compile_times.py; ptxas runs as a subprocess and much of the rest outside the GIL). The launch that needs a kernel waits for
its compile (wait) and then finds it in Triton's cache. A compile that fails here is dropped: the launch compiles it
again itself and raises whatever the error is, where the user sees it.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

_log = logging.getLogger("hf_flash")
_PENDING = {}  # launch key -> Future of its compile
_lock = threading.Lock()
_executor = None


def submit(key, compile_fn):
    """Runs compile_fn() on a worker thread, unless a compile for key is already pending."""
    global _executor
    with _lock:
        if key in _PENDING:
            return
        if _executor is None:  # two workers: the dQ and the dK/dV kernels
            _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_flash-compile")
        _PENDING[key] = _executor.submit(_quietly, compile_fn)


def wait(key):
    """Waits for the compile started ahead for key, if there is one."""
    with _lock:
        future = _PENDING.pop(key, None)
    if future is not None:
        future.result()


def wait_all():
    """Waits for every pending compile and forgets them (launch.reset_tuning)."""
    with _lock:
        futures = list(_PENDING.values())
        _PENDING.clear()
    for future in futures:
        future.result()


def _quietly(compile_fn):
    try:
        compile_fn()
    except Exception as error:  # the launch compiles it again and raises it there
        _log.debug("compiling a kernel ahead of its launch failed (%r); its launch compiles it", error)
