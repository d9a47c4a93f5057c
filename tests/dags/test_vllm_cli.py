"""The arguments the serve task gives vLLM, parsed by vLLM's own `vllm serve` parser (the pinned release, in a side
environment on the CPU: tests/vllm-cli-requirements.txt) and checked by its serve-argument validation and its
LoRA config, as the server would on start. A flag vLLM renamed or dropped fails here, not in a pod.

The test command sets up `.venv-vllm`; `.ci/run` sets GEMMA_PIPELINE_REQUIRE_VLLM=1, so CI fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from gemma_pipeline.plan import serving

from tests.conftest import ROOT

PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# Runs in the side environment: parse each argument list, or say why vLLM refuses it.
PARSE = r"""
import contextlib, io, json, os, sys
from importlib.metadata import version
os.environ["VLLM_TARGET_DEVICE"] = "cpu"  # else vLLM looks for an accelerator to pick its platform
from vllm.config.lora import LoRAConfig
from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = make_arg_parser(FlexibleArgumentParser())
out = {"version": version("vllm"), "rank_choices": list(parser._option_string_actions["--max-lora-rank"].choices), "parsed": []}
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(args)
        validate_parsed_serve_args(ns)
        if ns.enable_lora:
            LoRAConfig(max_lora_rank=ns.max_lora_rank, max_loras=ns.max_loras, max_cpu_loras=ns.max_cpu_loras)
    except (SystemExit, ValueError, TypeError) as e:
        out["parsed"].append({"error": err.getvalue().strip().splitlines()[-1:] or [str(e)]})
        continue
    out["parsed"].append({k: getattr(ns, k) for k in ("model", "served_model_name", "host", "port", "max_model_len",
                                                       "enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank")}
                         | {"lora_modules": [[m.name, m.path, m.base_model_name] for m in ns.lora_modules or []]})
print(json.dumps(out))
"""

RECORD = {"champion": "b", "candidates": [
    {"key": k, "prefixes": {"convert": f"gs://bkt/runs/r/candidates/{k}/convert"}} for k in ("a", "b")]}


@pytest.fixture(scope="module")
def vllm():
    if not PYTHON.exists():
        message = f"no {PYTHON.parent.parent.name} (python3 -m venv .venv-vllm && .venv-vllm/bin/pip install --no-deps -r tests/vllm-cli-requirements.txt)"
        if os.environ.get("GEMMA_PIPELINE_REQUIRE_VLLM") == "1":
            pytest.fail(message)
        pytest.skip(message)

    def parse(*arg_lists: list[str]) -> dict:
        result = subprocess.run([str(PYTHON), "-c", PARSE, json.dumps(arg_lists)], capture_output=True, text=True,
                                timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("VLLM_")})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])
    return parse


def test_the_serve_tasks_flags_are_vllms_own(vllm):
    merged = serving.served(RECORD, {"b": 8})["args"]
    several = serving.served(RECORD, {"a": 4, "b": 12})["args"]
    result = vllm(merged, several, [*merged, "--max-lora-rnak=16"], [*several[:-1], "--max-lora-rank=12"])
    assert result["version"] == serving.VLLM_VERSION  # the release the image is pinned to
    assert tuple(result["rank_choices"]) == serving.LORA_RANKS
    one, many, typo, odd = result["parsed"]
    assert one["model"] == "/models" and one["served_model_name"] == [serving.APPROVED_NAME] and not one["enable_lora"]
    assert (one["host"], one["port"], one["max_model_len"]) == ("0.0.0.0", serving.SERVING["port"], 4096)
    assert many["enable_lora"] and many["model"] == "/models/base" and many["served_model_name"] == [serving.BASE_NAME]
    assert many["lora_modules"] == [[serving.APPROVED_NAME, "/models/adapters/b", serving.BASE_NAME],
                                    ["b", "/models/adapters/b", serving.BASE_NAME], ["a", "/models/adapters/a", serving.BASE_NAME]]
    assert (many["max_loras"], many["max_cpu_loras"], many["max_lora_rank"]) == (3, 3, 16)  # 12 rounded up
    # The parser is strict: what we would get wrong is refused, so the checks above mean something.
    assert "unrecognized arguments: --max-lora-rnak=16" in typo["error"][0]
    assert "invalid choice: 12" in odd["error"][0]
