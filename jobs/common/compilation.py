"""JAX's persistent compilation cache for a stage's process: models of one architecture (the base and a tuned
model, every candidate) compile to the same programs, so the second one loads the first one's executables instead
of compiling them again (the weights are arguments of keras-hub's compiled functions, not constants)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
ENV = "JAX_COMPILATION_CACHE_DIR"  # a deployment's own cache location wins (JAX reads it itself)


def enable_cache(default_dir: Path) -> str:
    """Turn the cache on (in `default_dir` unless JAX_COMPILATION_CACHE_DIR names one), for every program that took
    over half a second to compile; returns the directory."""
    import jax

    directory = os.environ.get(ENV) or str(default_dir)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    log.info("XLA compilation cache: %s", directory)
    return directory
