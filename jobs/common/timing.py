"""Where a stage's wall time goes: imports, model load, compilation, compute, staging I/O, publish (and the rest).

One clock per process. Code marks what it is doing with `phase(name)`; phases nest, and time is charged to the
innermost one (a download inside a model load is staging, not model load). JAX reports its compilations as
events (`jax.monitoring`): their seconds are moved from the phase they happened in to `compilation`, so `compute`
is the time spent computing once the programs exist. The split goes into each manifest's metrics
(`documents.TIME_SPLIT`), with the persistent compilation cache's hits and misses.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

from jobs.contract.documents import COMPILE_CACHE, PHASES, TIME_SPLIT

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# JAX's duration events for turning a traced function into an executable (tracing, lowering to MLIR, the backend's
# compile); a persistent-cache hit replaces the last by a read.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
CACHE_HIT, CACHE_MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def process_started() -> float:
    """When this process started (epoch seconds): the interpreter's start-up and imports before any phase count
    as imports. Linux's /proc; elsewhere, when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class Clock:
    def __init__(self, started: float | None = None) -> None:
        self.started = started if started is not None else process_started()
        self.seconds: dict[str, float] = defaultdict(float)
        self.compiled_in: dict[str, float] = defaultdict(float)
        self.cache = {"hits": 0, "misses": 0}
        self._stack: list[str] = []
        self._base = "other"  # what time outside any phase block is (`begin`)
        self._mark = time.time()
        self._listening = False
        # What ran before the first phase (interpreter start-up, the entry point's imports) is imports.
        self.seconds["imports"] += max(0.0, self._mark - self.started)

    def _charge(self) -> None:
        now = time.time()
        self.seconds[self._current()] += now - self._mark
        self._mark = now

    def _current(self) -> str:
        return self._stack[-1] if self._stack else self._base

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"phase {name!r}; expected one of {', '.join(PHASES)}")
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def begin(self, name: str) -> None:
        """From now on, time outside any `phase` block is `name`'s (for a stage's straight-line code: load, then
        compute, then publish)."""
        if name not in PHASES:
            raise ValueError(f"phase {name!r}; expected one of {', '.join(PHASES)}")
        self._charge()
        self._base = name

    def listen_to_jax(self, monitoring: Any) -> None:
        """Count JAX's compilations and persistent-cache hits from now on (once per process). `monitoring` is
        `jax.monitoring`, passed in so that stages without JAX (convert) never import it."""
        if self._listening:
            return

        def on_duration(event: str, duration: float, **_: Any) -> None:
            if event in COMPILE_EVENTS:
                self.compiled_in[self._current()] += duration

        def on_event(event: str, **_: Any) -> None:
            if event == CACHE_HIT:
                self.cache["hits"] += 1
            elif event == CACHE_MISS:
                self.cache["misses"] += 1

        monitoring.register_event_duration_secs_listener(on_duration)
        monitoring.register_event_listener(on_event)
        self._listening = True

    def split(self) -> dict[str, float]:
        """Seconds per phase since the process started, summing to the wall time so far."""
        self._charge()
        out = {name: self.seconds.get(name, 0.0) for name in PHASES}
        compiled = 0.0
        for name, seconds in self.compiled_in.items():
            moved = min(seconds, out[name])  # events overlap slightly with their phase's edges
            out[name] -= moved
            compiled += moved
        out["compilation"] += compiled
        return {name: round(seconds, 2) for name, seconds in out.items()}

    def record(self) -> dict[str, Any]:
        """What a manifest's metrics carry: the split, and the cache's hits and misses when JAX ran."""
        split = self.split()
        total = sum(split.values())
        log.info("wall time %.1f s: %s", total, ", ".join(f"{k} {v:.1f} s" for k, v in split.items() if v >= 0.05))
        out: dict[str, Any] = {TIME_SPLIT: split}
        if self._listening:
            out[COMPILE_CACHE] = dict(self.cache)
            log.info("XLA compilation cache: %d hits, %d misses", self.cache["hits"], self.cache["misses"])
        return out


_CLOCK: Clock | None = None


def clock() -> Clock:
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = Clock()
    return _CLOCK


def phase(name: str):
    """`with timing.phase("model_load"): ...` on this process's clock."""
    return clock().phase(name)


def begin(name: str) -> None:
    clock().begin(name)


def timed(name: str) -> Callable[[F], F]:
    """Decorator form of `phase`."""
    def wrap(fn: F) -> F:
        @wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with phase(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap
