"""Convert: wall time and peak RSS against the checkpoint size, for its two paths, in this run, interleaved over
--rounds rounds:

- without the training stack (`--finetune PREFIX`, what the DAG runs on a Hugging Face base such as the demo's):
  the PEFT adapter merged into the base's safetensors tensor by tensor, checked against the recorded logits;
- through keras-hub (`--adapter PREFIX/adapter.lora.h5` given, which takes the Keras path): the base loaded in
  Keras with the adapter, merged, exported with `export_to_transformers`, checked against the Keras model; the
  baseline, as convert ran before.

Each conversion runs as its own `python -m jobs.convert` process (as in its Job), so the peak RSS is that of
the stage alone; the baseline is the exported float32 checkpoint's size. Needs a finished fine-tune, e.g. the
main command's demo run. Run: .venv/bin/python bench/convert_footprint.py
[--finetune runs/local/gcs/local-gemma-bucket/runs/demo/candidates/default/finetune] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    manifest = args.finetune / artifacts.MANIFEST
    if not manifest.exists():
        sys.exit(f"no finished fine-tune at {args.finetune}: run the main command first (see README)")
    settings = json.loads(manifest.read_text())["config"]
    base = settings["base_model"]
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    contenders = {
        "without Keras": ["--finetune", str(args.finetune)],
        "through keras-hub": ["--finetune", str(args.finetune), "--base-model", base, "--adapter", str(args.finetune / artifacts.ADAPTER)],
    }
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(convert(contenders[name], work / f"{r}-{name.replace(' ', '-')}"))
    print(f"{'path':<20}{'wall s (median, range)':>26}{'checkpoint MiB':>16}{'peak RSS MiB':>14}{'RSS/ckpt':>10}")
    for name, results in runs.items():
        walls = [m["wall_s"] for m in results]
        rss = max(m["peak_rss_bytes"] for m in results)
        print(f"{name:<20}{statistics.median(walls):>10.1f} ({min(walls):.1f}-{max(walls):.1f}){'':>6}"
              f"{results[0]['checkpoint_bytes'] / 2**20:>16.0f}{rss / 2**20:>14.0f}{rss / results[0]['checkpoint_bytes']:>10.2f}")
        print(f"{'':<20}path: {results[0]['path']}")
    ratios = sorted(k["wall_s"] / w["wall_s"] for k, w in zip(runs["through keras-hub"], runs["without Keras"], strict=True))
    print(f"wall time, through keras-hub / without Keras: median {statistics.median(ratios):.2f}x, "
          f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x (goal: a third or less, i.e. >= 3x)")
    # What the interpreter and the stage's libraries hold before any model is loaded: a floor that does not
    # grow with the model, so the ratio for bigger checkpoints is smaller than here.
    probe = ("import resource, jobs.convert.core, torch, transformers, keras_hub; "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    floor = int(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    print(f"imports alone (both paths' libraries): {floor / 2**20:.0f} MiB peak RSS; goal: peak RSS <= 2x checkpoint")

if __name__ == "__main__":
    main()
