"""DAG parse time vs Airflow's own example DAG, in the same interpreter and run.

Cold: a fresh interpreter imports each DAG file (what a Composer parsing process pays once per file).
Warm: the file is re-executed with its imports cached (what every re-parse pays).
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


def cold(path: Path, repeats: int) -> float:
    code = f"import sys, time; sys.path.insert(0, {str(ROOT / 'dags')!r}); t = time.perf_counter(); import runpy; runpy.run_path({str(path)!r}); print(time.perf_counter() - t)"
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
    for label, fn, n in (("cold", cold, 5), ("warm", warm, 20)):
        a, b = fn(ours, n), fn(theirs, n)
        results[label] = (a, b)
        print(f"{label}: gemma_lora_finetune {a * 1000:.1f} ms, {theirs.name} {b * 1000:.1f} ms, ratio {a / b:.2f}x (median of {n})")
    print(f"goal: at most 1.5x the example DAG -> {'met' if results['cold'][0] / results['cold'][1] <= 1.5 else 'NOT met'} (cold)")


if __name__ == "__main__":
    main()
