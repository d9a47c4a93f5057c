"""`write` or `check` a set of generated, checked-in files (the k8s manifests)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def main(render: Callable[[], dict[str, str]], module: str, description: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description, allow_abbrev=False)
    parser.add_argument("command", choices=("write", "check"))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    expected = render()
    if args.command == "write":
        for name, text in expected.items():
            (args.directory / name).parent.mkdir(parents=True, exist_ok=True)
            (args.directory / name).write_text(text)
        return 0
    stale = [n for n, t in expected.items() if not (args.directory / n).exists() or (args.directory / n).read_text() != t]
    if stale:
        print(f"stale generated files in {args.directory}: {', '.join(stale)}; run: python -m {module} write {args.directory}")
    return 1 if stale else 0
