"""Chaos across the whole DAG on the local backend.

    .venv/bin/python -m tests.reliability.chaos --kills 6 --seed 1      # prints the kills and the comparison

A reference run first (uninterrupted). Then the same DAG under another run name while, at moments drawn from the
seed: stage processes are SIGKILLed from outside (whatever they are doing), stage processes SIGKILL themselves
right after publishing a file or right before writing their manifest (`jobs.common.faults`), and the Cloud
Storage emulator is SIGKILLed once and restarted. Airflow retries (the retry delay shortened to 1 s) and the DAG
is re-triggered until it finishes. Then:

- every manifest in the bucket lists outputs whose bytes match it, and names as inputs the exact manifests
  (by digest) that are there: no stage read a prefix without a complete manifest;
- the chaos run's data splits are byte-identical to the reference's, its adapter and exported weights equal
  within 1e-6, its perplexities and parity result equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.contract.artifacts import MANIFEST
from tests.support import nonempty

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "local-gemma-bucket"


def conf(model: Path, run_name: str) -> dict[str, Any]:
    return {"base_model": str(model), "max_steps": 8, "checkpoint_every": 2, "batch_size": 2, "max_tokens": 64,
            "sequence_length": 64, "run_name": run_name, "candidates": [{}], "bootstrap": 50}


def Emulator(root: Path) -> Any:  # noqa: N802  (the local backend's emulator, on a port it can come back on)
    from gemma_pipeline import local

    return local.Emulator(root, port=local.free_port())


def stage_processes() -> list[tuple[int, str]]:
    """(pid, module) of every running stage process on this machine (the local backend's Jobs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in argv:
            module = argv[argv.index(b"-m") + 1].decode(errors="replace") if argv.index(b"-m") + 1 < len(argv) else ""
            if module.startswith("jobs."):
                found.append((int(entry.name), module))
    return found


def run_dag(root: Path, env: dict[str, str], run_conf: dict[str, Any], log: Path) -> int:
    command = [sys.executable, "-m", "gemma_pipeline.tools.local_run", "--root", str(root), "-c", json.dumps(run_conf)]
    with log.open("a") as handle:
        return subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode


STAGES = ("preprocessing", "finetuning", "benchmark", "convert")


def plan_kills(kills: int, seed: int) -> list[dict[str, Any]]:
    """`kills` kills drawn from the seed: one emulator kill, the rest SIGKILLs of a stage process, from outside
    at a random moment of its life or by itself at an upload or right before its manifest is written."""
    rng = random.Random(seed)
    plan = [{"kind": "emulator", "after_s": round(rng.uniform(5, 60), 1)}]
    for _ in range(kills - 1):
        kind, stage = rng.choice(["outside", "outside", "upload", "manifest"]), rng.choice(STAGES)
        entry: dict[str, Any] = {"kind": kind, "stage": stage}
        if kind == "outside":
            entry["after_s"] = round(rng.uniform(0, 6), 1)  # into the process's life
        else:  # the fine-tune publishes a checkpoint every 2 steps before its final upload
            entry["hit"] = rng.randint(1, 4) if kind == "upload" and stage == "finetuning" else 1
        plan.append(entry)
    return plan


def chaos_run(root: Path, env: dict[str, str], run_conf: dict[str, Any], emulator: Any, plan: list[dict[str, Any]],
              max_triggers: int = 12) -> list[dict[str, Any]]:
    """Trigger until the DAG finishes while the planned kills land. Returns the kills that landed, in order."""
    markers = root / "fault-markers"
    markers.mkdir(exist_ok=True)
    faults = {f"{k['kind']}:{k['hit']}:{k['stage']}:{markers / f'fault-{i}'}": k for i, k in enumerate(plan)
              if k["kind"] in ("upload", "manifest")}
    outside = sorted((k for k in plan if k["kind"] == "outside"), key=lambda k: STAGES.index(k["stage"]))
    events: list[dict[str, Any]] = []
    done = threading.Event()
    started = time.monotonic()

    def at() -> float:
        return round(time.monotonic() - started, 1)

    def emulator_killer() -> None:
        entry = plan[0]
        if not done.wait(entry["after_s"]):
            emulator.kill()
            events.append({"kind": "emulator", "at_s": at()})
            time.sleep(2)
            emulator.start()

    def stage_killer() -> None:
        for entry in outside:
            module = f"jobs.{entry['stage']}"
            while not done.is_set():
                pids = [pid for pid, m in stage_processes() if m == module]
                if pids:
                    time.sleep(entry["after_s"])
                    try:
                        os.kill(pids[0], signal.SIGKILL)
                    except ProcessLookupError:
                        continue  # it finished first: wait for its next process
                    events.append({"kind": "outside", "stage": entry["stage"], "after_s": entry["after_s"], "at_s": at()})
                    break
                time.sleep(0.1)

    threads = [threading.Thread(target=emulator_killer, daemon=True), threading.Thread(target=stage_killer, daemon=True)]
    for thread in threads:
        thread.start()
    seen: set[str] = set()
    for trigger in range(1, max_triggers + 1):
        pending = [spec for spec in faults if not Path(spec.split(":", 3)[3]).exists()]
        trigger_env = {**env, "GEMMA_PIPELINE_FAULT": ";".join(pending)} if pending else env
        code = run_dag(root, trigger_env, run_conf, root / "chaos.log")
        for spec, entry in faults.items():
            marker = Path(spec.split(":", 3)[3])
            if marker.exists() and spec not in seen:
                seen.add(spec)
                events.append({"kind": entry["kind"], "stage": entry["stage"], "hit": entry["hit"],
                               "at_s": round(marker.stat().st_mtime - time.time() + time.monotonic() - started, 1)})
        print(f"trigger {trigger}: exit {code}; kills so far {len(events)}", flush=True)
        if code == 0:
            break  # finished: kills not yet spent can no longer land (the result lists those that did)
    done.set()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(events, key=lambda e: e["at_s"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifests(bucket_dir: Path) -> int:
    """Every manifest's outputs match the bytes beside it, and every input it names by manifest digest is the
    manifest that is there. Returns how many manifests were checked."""
    checked = 0
    for manifest_path in nonempty(sorted(bucket_dir.rglob(MANIFEST)), f"manifests under {bucket_dir}"):
        manifest = json.loads(manifest_path.read_text())
        for name, meta in manifest["outputs"].items():
            assert _sha256(manifest_path.parent / name) == meta["sha256"], f"{manifest_path.parent / name} differs from its manifest"
        for ref in manifest["inputs"]:
            if "manifest_sha256" in ref:
                upstream = bucket_dir.parent / ref["uri"].removeprefix("gs://") / "_manifest.json"
                actual = hashlib.sha256(json.dumps(json.loads(upstream.read_text()), sort_keys=True, default=str).encode()).hexdigest()
                assert actual == ref["manifest_sha256"], f"{manifest_path} read {ref['uri']} at a manifest that is not there"
        checked += 1
    return checked


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: arrays.__setitem__(name, np.asarray(obj)) if hasattr(obj, "shape") else None)
    return arrays


def compare(reference: Path, chaos: Path) -> dict[str, Any]:
    """The chaos run's products against the reference's; raises on any difference beyond 1e-6."""
    from safetensors.numpy import load_file

    champion = lambda run: json.loads((run / "champion.json").read_text())["champion"]  # noqa: E731
    ref_c, chaos_c = reference / "candidates" / champion(reference), chaos / "candidates" / champion(chaos)
    for name in ("train.jsonl", "eval.jsonl"):
        assert _sha256(reference / "preprocess" / name) == _sha256(chaos / "preprocess" / name), name
    diffs = {}
    a, b = _h5_arrays(ref_c / "finetune" / "adapter.lora.h5"), _h5_arrays(chaos_c / "finetune" / "adapter.lora.h5")
    assert a.keys() == b.keys() and a
    diffs["adapter"] = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    ta, tb = load_file(ref_c / "convert" / "model.safetensors"), load_file(chaos_c / "convert" / "model.safetensors")
    assert ta.keys() == tb.keys()
    diffs["export"] = max(float(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()) for k in ta)
    ra, rb = (json.loads((c / "benchmark" / "report.json").read_text()) for c in (ref_c, chaos_c))
    diffs["perplexity"] = max(abs(ra["models"][m]["splits"]["eval"]["perplexity"] - rb["models"][m]["splits"]["eval"]["perplexity"])
                              / ra["models"][m]["splits"]["eval"]["perplexity"] for m in ("base", "tuned"))
    assert ra["models"]["tuned"]["splits"]["eval"]["tokens_sha256"] == rb["models"]["tuned"]["splits"]["eval"]["tokens_sha256"]
    assert all(v <= 1e-6 for v in diffs.values()), diffs
    pa, pb = (json.loads((c / "convert" / "parity.json").read_text()) for c in (ref_c, chaos_c))
    assert pa["passed"] and pb["passed"]
    report = json.loads((chaos / "report.json").read_text())
    assert report["complete"] is True
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="kills in all, one of them the emulator's (default 6)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--root", type=Path, default=None, help="work directory (default: a new one under /tmp)")
    args = parser.parse_args(argv)
    import tempfile

    from tests.tiny_models import save_tiny_preset

    root = args.root or Path(tempfile.mkdtemp(prefix="chaos-"))
    model = root / "tiny" if (root / "tiny" / "config.json").exists() else save_tiny_preset(root / "tiny")
    emulator = Emulator(root)
    emulator.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GEMMA_PIPELINE_"))}
    env.update({"STORAGE_EMULATOR_HOST": emulator.url, "GEMMA_PIPELINE_RETRY_DELAY_S": "1"})
    try:
        started = time.monotonic()
        assert run_dag(root, env, conf(model, "reference"), root / "reference.log") == 0, f"reference run failed: {root}/reference.log"
        print(f"reference run: {time.monotonic() - started:.0f} s", flush=True)
        started = time.monotonic()
        plan = plan_kills(args.kills, args.seed)
        events = chaos_run(root, env, conf(model, "chaos"), emulator, plan)
        print(f"chaos run: {time.monotonic() - started:.0f} s, {len(events)} of {len(plan)} planned kills landed "
              f"(seed {args.seed}):")
        for event in events:
            print(f"  {event}")
        runs = root / "gcs" / BUCKET / "runs"
        print(f"manifests checked: {check_manifests(root / 'gcs' / BUCKET)}")
        diffs = compare(runs / "reference", runs / "chaos")
        print(f"chaos vs reference: splits identical; max |diff| adapter {diffs['adapter']:.2e}, export "
              f"{diffs['export']:.2e}; perplexity relative diff {diffs['perplexity']:.2e}; parity passed")
        result = {"seed": args.seed, "planned": plan, "kills": events, "diffs": diffs}
        (root / "chaos-result.json").write_text(json.dumps(result, indent=2))
        return 0
    finally:
        emulator.kill()


if __name__ == "__main__":
    sys.exit(main())
