"""Convert: wall time and peak RSS against the checkpoint size, for both inputs the stage accepts, in this run:

- the fine-tune's merged preset (`--finetune PREFIX`, what the DAG runs);
- the base model plus the LoRA adapter (`--base-model ... --adapter ...`).

Each conversion runs as its own `python -m jobs.convert` process (as in its Job), so the peak RSS is that of
the stage alone; the baseline is the exported float32 checkpoint's size. Needs a finished fine-tune, e.g. the
main command's demo run. Run: .venv/bin/python bench/convert_footprint.py
[--finetune runs/local/gcs/local-gemma-bucket/runs/demo/candidates/default/finetune]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.contract import artifacts, stages

ROOT = Path(__file__).resolve().parent.parent
DEMO_FINETUNE = ROOT / "runs/local/gcs/local-gemma-bucket/runs/demo/candidates/default/finetune"


def convert(args: list[str], output: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", stages.get("convert").module, "--output", str(output), *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    metrics = json.loads((output / artifacts.MANIFEST).read_text())["metrics"]
    return {"wall_s": wall, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetune", type=Path, default=DEMO_FINETUNE)
    args = parser.parse_args()
    manifest = args.finetune / artifacts.MANIFEST
    if not manifest.exists():
        sys.exit(f"no finished fine-tune at {args.finetune}: run the main command first (see README)")
    settings = json.loads(manifest.read_text())["config"]
    base = settings["base_model"]
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    runs = {
        "merged preset": convert(["--finetune", str(args.finetune)], work / "merged"),
        "base + adapter": convert(["--finetune", str(args.finetune), "--base-model", base,
                                   "--adapter", str(args.finetune / artifacts.ADAPTER)], work / "adapter"),
    }
    print(f"{'input':<16}{'wall s':>8}{'export s':>10}{'checkpoint MiB':>16}{'peak RSS MiB':>14}{'RSS/ckpt':>10}")
    for name, m in runs.items():
        print(f"{name:<16}{m['wall_s']:>8.1f}{m['export_time_s']:>10.1f}{m['checkpoint_bytes'] / 2**20:>16.0f}"
              f"{m['peak_rss_bytes'] / 2**20:>14.0f}{m['peak_rss_bytes'] / m['checkpoint_bytes']:>10.2f}")
    # What the interpreter and the stage's libraries hold before any model is loaded: a floor that does not
    # grow with the model, so the ratio for bigger checkpoints is smaller than here.
    probe = ("import resource, jobs.convert.core, torch, transformers, keras_hub; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    floor = int(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    print(f"imports alone: {floor / 2**20:.0f} MiB peak RSS; goal: peak RSS <= 1.5x checkpoint")

if __name__ == "__main__":
    main()
