"""The stage registry: each stage's module, config, image, default accelerator profile, what it writes and
what it reads from which upstream stage. The DAG's plan and Job builder, `k8s/jobs`, the report and the stages'
code identity read it; `reads` names the upstream stages a config's `upstream=` options point at (a test keeps
the two equal)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.contract import artifacts as a
from jobs.contract.configs.benchmark import BenchmarkConfig
from jobs.contract.configs.convert import ConvertConfig
from jobs.contract.configs.finetune import FinetuneConfig
from jobs.contract.configs.preprocess import PreprocessConfig


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # `python -m MODULE` is the container's command
    config: type  # a frozen dataclass of `spec.option`s: the CLI, the DAG's Params and the Job's arguments
    default_profile: str  # the trigger form's default, and the profile `k8s/jobs` renders
    writes: tuple[str, ...]  # what a user opens first in its prefix ("" is the prefix itself)
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)  # upstream stage -> the artifacts it reads
    per_candidate: bool = True  # False: shared by every candidate of a run (preprocessing)
    gpu_image: bool = False  # also built with JAX's CUDA build, used on GPU profiles

    @property
    def image(self) -> str:
        return self.name

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module]


_SPLITS = (a.split_file(a.TRAIN), a.split_file(a.EVAL))
REGISTRY: dict[str, Stage] = {s.name: s for s in (
    Stage("preprocess", "jobs.preprocessing", PreprocessConfig, "cpu",
          writes=(*_SPLITS, a.STATS), per_candidate=False),
    Stage("finetune", "jobs.finetuning", FinetuneConfig, "tpu-v5e-1",
          writes=(a.ADAPTER, f"{a.PEFT_ADAPTER}/", a.REFERENCE_LOGITS, f"{a.MERGED_MODEL}/", a.TRAIN_METRICS,
                  a.LOSS_CURVE, f"{a.TENSORBOARD}/"),
          reads={"preprocess": _SPLITS}, gpu_image=True),
    Stage("benchmark", "jobs.benchmark", BenchmarkConfig, "tpu-v5e-1",
          writes=(a.BENCHMARK_REPORT, a.PERPLEXITY_CHART),
          reads={"preprocess": (a.split_file(a.EVAL),), "finetune": (a.ADAPTER,)}, gpu_image=True),
    Stage("convert", "jobs.convert", ConvertConfig, "cpu",
          writes=("", a.PARITY, f"{a.PEFT_ADAPTER}/", a.ANSWERS, a.MODEL_CARD),
          reads={"preprocess": (a.split_file(a.EVAL),),
                 "finetune": (f"{a.PEFT_ADAPTER}/", a.REFERENCE_LOGITS, a.ADAPTER, f"{a.MERGED_MODEL}/"),
                 "benchmark": (a.BENCHMARK_REPORT,)}),
)}
NAMES = tuple(REGISTRY)
CANDIDATE_STAGES = tuple(name for name, s in REGISTRY.items() if s.per_candidate)
DEFAULT_PROFILES = {name: s.default_profile for name, s in REGISTRY.items()}

# The preprocessing stage's second engine: Apache Beam, on Dataflow (its own image and environment).
BEAM_MODULE = "jobs.preprocessing.beam"
BEAM_IMAGE = "preprocess-beam"
IMAGE_NAMES = (*NAMES, *(f"{n}-gpu" for n, s in REGISTRY.items() if s.gpu_image), BEAM_IMAGE)


def get(name: str) -> Stage:
    if name not in REGISTRY:
        raise ValueError(f"stage: got {name!r}; expected one of {', '.join(NAMES)}")
    return REGISTRY[name]
