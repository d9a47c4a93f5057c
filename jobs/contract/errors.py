"""Exit codes and the exceptions that map to them.

0 is success, 2 is bad input or bad config (never worth a retry), 3 is a failed quality gate, 4 an export
that does not reproduce the Keras model (neither is retried), 143 is a preemption (SIGTERM, checkpoint saved), and anything else is a retriable failure.
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_QUALITY_GATE = 3
EXIT_EXPORT_MISMATCH = 4
EXIT_PREEMPTED = 143
NON_RETRIABLE_EXIT_CODES = (EXIT_BAD_INPUT, EXIT_QUALITY_GATE, EXIT_EXPORT_MISMATCH)
# What each non-retriable code means, in the words task logs and errors use.
EXIT_MEANINGS = {EXIT_BAD_INPUT: "bad input", EXIT_QUALITY_GATE: "quality gate", EXIT_EXPORT_MISMATCH: "export mismatch"}


def non_retriable_legend() -> str:
    """'2 bad input, 3 quality gate, 4 export mismatch': the legend every non-retriable failure message carries."""
    return ", ".join(f"{code} {EXIT_MEANINGS[code]}" for code in NON_RETRIABLE_EXIT_CODES)


class BadInputError(Exception):
    """Input or configuration the stage can never succeed with; the message says what to fix."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, field: str, value: Any, expected: str, detail: str = "") -> None:
        self.field, self.value, self.expected, self.detail = field, value, expected, detail
        message = f"{field}: got {value!r}; expected {expected}"
        super().__init__(f"{message}. {detail}" if detail else message)

    def __reduce__(self):  # picklable with its fields (engines that ship errors between processes)
        return type(self), (self.field, self.value, self.expected, self.detail)


class QualityGateError(Exception):
    exit_code = EXIT_QUALITY_GATE


class ExportMismatchError(Exception):
    exit_code = EXIT_EXPORT_MISMATCH


class PreemptedError(Exception):
    """Raised after a checkpoint was saved in response to SIGTERM; the next attempt resumes."""

    exit_code = EXIT_PREEMPTED
