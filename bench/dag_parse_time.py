"""DAG parse time vs Airflow's own example DAG, in the same interpreter and run.

Cold: a fresh interpreter imports each DAG file, nothing imported beforehand.
DAG processor: a fresh interpreter that first imports the `airflow.*` modules the file names, untimed, as
Airflow 3's DAG processor does before forking each parsing process ([dag_processor]
parsing_pre_import_modules, on by default): what each parse of the file costs on Composer.
Warm: the file is re-executed in the same interpreter with every import cached.
Run: .venv/bin/python bench/dag_parse_time.py
"""

from __future__ import annotations

import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".pytest_cache" / "airflow"))
sys.path.insert(0, str(ROOT / "dags"))


def example_dag() -> Path:
    import airflow

    base = Path(airflow.__file__).parent
    for candidate in ("providers/standard/example_dags/example_bash_operator.py", "example_dags/example_bash_operator.py"):
        if (base / candidate).exists():
            return base / candidate
    return next(base.rglob("example_bash_operator.py"))


def cold(path: Path, repeats: int, pre_import: bool = False) -> float:
    """A fresh interpreter per parse; with `pre_import`, the `airflow.*` modules the file names are imported
    first, untimed, as Airflow's DAG processor does before it forks the parsing process."""
    setup = (f"from airflow.utils.file import iter_airflow_imports; import importlib; "
             f"[importlib.import_module(m) for m in iter_airflow_imports({str(path)!r})]; ") if pre_import else ""
    code = f"import sys, time; sys.path.insert(0, {str(ROOT / 'dags')!r}); {setup}t = time.perf_counter(); import runpy; runpy.run_path({str(path)!r}); print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ).stdout.strip().splitlines()[-1])
             for _ in range(repeats)]
    return statistics.median(times)


def warm(path: Path, repeats: int) -> float:
    runpy.run_path(str(path))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runpy.run_path(str(path))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    ours, theirs = ROOT / "dags" / "gemma_lora_finetune.py", example_dag()
    results = {}
    measures = (("cold", lambda p, n: cold(p, n), 5),
                ("dag processor (pre-imported)", lambda p, n: cold(p, n, pre_import=True), 5),
                ("warm", warm, 20))
    for label, fn, n in measures:
        a, b = fn(ours, n), fn(theirs, n)
        results[label] = (a, b)
        print(f"{label}: gemma_lora_finetune {a * 1000:.1f} ms, {theirs.name} {b * 1000:.1f} ms, ratio {a / b:.2f}x (median of {n})")
    for label, (a, b) in results.items():
        print(f"goal: at most 1.5x the example DAG, {label}: {'met' if a / b <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
