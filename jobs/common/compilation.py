"""JAX's persistent compilation cache, shared by every stage, candidate and run of a deployment.

Models of one architecture (the base and a tuned model, every candidate) compile to the same programs (the
weights are arguments of the compiled functions, not constants), so whichever process compiles a shape first
saves every later one the compile. Where the cache lives:

- `JAX_COMPILATION_CACHE_DIR`, when set, is used as it is (JAX reads it itself);
- else `GEMMA_PIPELINE_COMPILATION_CACHE` (`env.COMPILATION_CACHE_ENV`): a local directory (the local backend
  sets one under its root) is used in place; a `gs://` prefix (set per deployment on GKE) is copied to `MIRROR`
  when the stage starts and the executables this stage added are uploaded when it ends (create-only, so two
  candidates that compiled the same program do not fight: the first upload wins and both are the same). The
  mirror's path is the same in every pod on purpose: JAX's cache key includes the cache directory (through the
  autotuning cache path in XLA's options), so a per-stage scratch path would never hit;
- else a directory in the stage's scratch space: the cache still serves the base and tuned model of one process.

Hits and misses are counted by `timing` (JAX's monitoring events) and recorded in the manifest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from jobs.common import storage, timing
from jobs.contract.env import COMPILATION_CACHE_ENV

log = logging.getLogger(__name__)
ENV = "JAX_COMPILATION_CACHE_DIR"  # a deployment's own JAX setting wins
MIRROR = Path(tempfile.gettempdir()) / "gemma-pipeline-xla-cache"  # a gs:// cache's local copy (see above)
MIN_COMPILE_TIME_S = 0.5  # programs quicker to compile than to fetch are not worth a cache entry


class Cache:
    def __init__(self, directory: Path, remote: str = "") -> None:
        self.directory = directory
        self.remote = remote  # a gs:// prefix the directory mirrors ("" when the directory is the cache itself)
        self.before = self._entries()

    def _entries(self) -> set[str]:
        if not self.directory.is_dir():
            return set()
        return {str(p.relative_to(self.directory)) for p in self.directory.rglob("*") if p.is_file()}

    def save(self) -> int:
        """Upload what this process added to a remote cache; returns how many entries."""
        if not self.remote:
            return 0
        added = sorted(self._entries() - self.before)
        with timing.phase("publish"):
            for name in added:
                try:
                    storage.write_bytes(storage.join(self.remote, name), (self.directory / name).read_bytes(),
                                        if_generation_match=0)
                except storage.Conflict:  # another stage uploaded the same program meanwhile
                    pass
        if added:
            log.info("XLA compilation cache: %d new executable(s) uploaded to %s", len(added), self.remote)
        self.before |= set(added)
        return len(added)


def enable_cache(workdir: Path) -> Cache:
    """Turn the persistent cache on for this process (see the module docstring for where it lives) and start
    counting compilations; returns the cache, whose `save()` the stage calls before it publishes."""
    import jax

    timing.clock().listen_to_jax(jax.monitoring)
    configured = os.environ.get(COMPILATION_CACHE_ENV, "")
    if os.environ.get(ENV):
        cache = Cache(Path(os.environ[ENV]))
    elif storage.is_gcs(configured):
        local = MIRROR
        if storage.list_files(configured):
            storage.stage_in(configured, local.parent, name=local.name)
        local.mkdir(parents=True, exist_ok=True)
        cache = Cache(local, configured)
    else:
        cache = Cache(Path(configured) if configured else workdir / "xla-cache")
    cache.directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache.directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    log.info("XLA compilation cache: %s (%d executables)%s", cache.directory, len(cache.before),
             f", mirrored from {configured}" if cache.remote else "")
    return cache
