"""`python -m gemma_pipeline.tools.generate write|check [TARGET ...]`: the files generated from the code and checked
in, so a `kubectl` user or a reader of the docs sees exactly what the code builds. `check` exits 1 naming what is
stale (the tests run it). Targets: jobs (k8s/jobs, from jobspec), kueue (k8s/kueue), serving (k8s/serving), params
(the params table in docs/configuration.md, from the trigger form), security (the gcloud commands in
docs/security.md, from the access policy), lm_eval_tasks (dags/gemma_pipeline/plan/lm_eval_tasks.json, the plan's
index of lm-eval's tasks and their metrics, from the installed lm-eval: the dev environment), model_presets
(dags/gemma_pipeline/plan/model_presets.json, keras-hub's presets of the supported families with their sizes, from
the installed keras-hub), models (the fit table in docs/models.md, from the plan's memory estimate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from gemma_pipeline.plan import access, eval_tasks, fit, form, kueue, manifests, serving

ROOT = Path(__file__).resolve().parents[3]  # the repository (dags/gemma_pipeline/tools/ -> .)
PARAMS_DOC = Path("docs/configuration.md")
SECURITY_DOC = Path("docs/security.md")
MODELS_DOC = Path("docs/models.md")


def _params() -> dict[str, str]:
    return {"": form.render((ROOT / PARAMS_DOC).read_text())}


def _models() -> dict[str, str]:
    return {"": fit.render_doc((ROOT / MODELS_DOC).read_text())}


def _security() -> dict[str, str]:
    return {"": access.render_doc((ROOT / SECURITY_DOC).read_text())}


TARGETS: dict[str, tuple[Path, Callable[[], dict[str, str]]]] = {
    "jobs": (Path("k8s/jobs"), manifests.render_all),
    "kueue": (Path("k8s/kueue"), kueue.render),
    "serving": (Path("k8s/serving"), serving.render),
    "params": (PARAMS_DOC, _params),
    "security": (SECURITY_DOC, _security),
    "lm_eval_tasks": (eval_tasks.INDEX.relative_to(ROOT), eval_tasks.render_index),
    "model_presets": (fit.INDEX.relative_to(ROOT), fit.render_index),
    "models": (MODELS_DOC, _models),
}


def stale(target: str, root: Path = ROOT) -> list[str]:
    """The files of `target` under `root` that differ from what the code renders."""
    where, render = TARGETS[target]
    return [str(where / name) for name, text in render().items()
            if not (root / where / name).is_file() or (root / where / name).read_text() != text]


def write(target: str, root: Path = ROOT) -> None:
    where, render = TARGETS[target]
    for name, text in render().items():
        path = root / where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_pipeline.tools.generate", description=__doc__,
                                     allow_abbrev=False)
    parser.add_argument("command", choices=("write", "check"))
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to write into or check (default: this one)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"TARGET: got {', '.join(unknown)}; expected any of {', '.join(TARGETS)}")
    found = []
    for target in args.targets or list(TARGETS):
        if args.command == "write":
            write(target, args.root)
        else:
            found += stale(target, args.root)
    if found:
        print(f"stale generated files: {', '.join(found)}; run: python -m gemma_pipeline.tools.generate write")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
