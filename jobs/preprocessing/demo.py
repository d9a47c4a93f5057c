"""The built-in offline demo dataset: question/answer pairs made from the standard library's docstrings.

Every Python install carries this human-written text, so the demo needs no download. The question asks
what an object does; the answer is the first paragraph of its docstring. The order is deterministic.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from collections.abc import Iterator

from jobs.contract.demo import DEMO_TEXT_URI, DEMO_URI  # noqa: F401 (re-exported: the demo sets' own URIs)

MODULES = (
    "abc", "argparse", "array", "base64", "bisect", "builtins", "calendar", "collections", "colorsys",
    "contextlib", "copy", "csv", "datetime", "decimal", "difflib", "email.utils", "enum", "filecmp",
    "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "mimetypes", "operator", "os",
    "os.path", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "secrets", "shlex",
    "shutil", "socket", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "typing", "unicodedata", "urllib.parse", "uuid", "warnings", "weakref",
    "zipfile", "zlib",
)


def _summary(doc: str) -> str:
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def demo_rows() -> Iterator[dict[str, str]]:
    """The rows, built in a fresh isolated interpreter: libraries imported into this process (and their
    monkeypatches) must not change the dataset."""
    result = subprocess.run([sys.executable, "-I", __file__], capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        yield json.loads(line)


def demo_text_rows() -> Iterator[dict[str, str]]:
    """One document per topic of the Python reference that every install ships for `help()` (`pydoc_data`,
    PSF license), in a fixed order: about half a megabyte of real technical prose, offline."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield {"text": topics[key], "source": f"pydoc_data.topics[{key}]"}


def _build_rows() -> Iterator[dict[str, str]]:
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", module_name) not in (module_name, module.__name__) and module_name != "builtins":
                continue  # re-exports are documented where they live
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            kind = "class" if inspect.isclass(obj) else "function"
            yield {
                "instruction": f"What does the Python {kind} `{module_name}.{name}` do?",
                "response": _summary(doc),
                "source": f"{module_name}.{name}",
            }


if __name__ == "__main__":
    for row in _build_rows():
        print(json.dumps(row))
