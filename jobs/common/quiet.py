"""TensorFlow's start-up notices, filtered where they are made. keras-hub imports TensorFlow (its tokenizers run on
tensorflow-text); on a machine without CUDA, TF's C++ start-up logs "Could not find cuda drivers" and a oneDNN
notice to stderr before its logging is configured, so TF_CPP_MIN_LOG_LEVEL cannot silence them (TF 2.21). The
stage's entry point imports TensorFlow through this, with stderr captured at the file-descriptor level, and writes
back every line except those notices: real errors still reach the log."""

from __future__ import annotations

import os
import sys
import tempfile

NOTICES = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called are written to STDERR",
           "oneDNN custom operations are on")


def import_tensorflow() -> None:
    """Import TensorFlow (when installed) without its CUDA and oneDNN start-up notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(notice in line for notice in NOTICES)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
