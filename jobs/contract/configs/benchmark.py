"""Typed, validated configuration of the benchmark stage: every option declared once (see jobs.contract.spec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jobs.contract import spec
from jobs.contract.demo import DEMO_MODEL_URI
from jobs.contract.errors import BadInputError
from jobs.contract.spec import SHARED, option

DESCRIPTION = ("Evaluation of the base and tuned models on the eval split: perplexity, task metrics of generated answers "
               "(exact match, ROUGE-L, chrF, stop rate) and lm-evaluation-harness tasks.")
# What `--champion-metric` may name besides `task:metric` of an `--eval-tasks` task; True: higher is better.
METRICS = {"perplexity": False, "exact_match": True, "rouge_l": True, "chrf": True, "stop_rate": True}
AUTO = "auto"  # rouge_l when answers are generated (instruction or chat data, --max-new-tokens > 0), else perplexity


@dataclass(frozen=True)
class BenchmarkConfig:
    data: str = option(help="output prefix of the preprocessing stage (its eval.jsonl is scored)", upstream="preprocess")
    output: str = option(help="output prefix (gs:// or local directory)", upstream="self")
    finetune: str = option("", "output prefix of the fine-tuning stage (its merged model is the tuned model; "
                               "empty: base only)", upstream="finetune")
    base_model: str = option(DEMO_MODEL_URI, "the base model, as given to the fine-tuning stage", param="base_model")
    mode: Literal["auto", "response", "text"] = option(
        "auto", "response: per example, response tokens only (every assistant turn for chat data); text: running "
                "text with sliding windows; auto: text for raw-text data, else response")
    max_length: int = option(128, "tokens per window (text mode) or per example (response mode)",
                             minimum=8, maximum=131072, param="sequence_length")
    stride: int = option(0, "window start step in text mode (0: half of the max length)", minimum=0)
    separator: str = option("\n\n", "text joining documents in text mode")
    ood_text: str = option("", "optional out-of-domain plain-text file (gs:// or local), scored in text mode to "
                               "show forgetting")
    batch_size: int = option(4, "windows per forward pass", minimum=1)
    max_examples: int = option(0, "score at most this many eval examples (0: all)", minimum=0)
    bootstrap: int = option(1000, "bootstrap resamples for the 95% interval (0: none)", minimum=0, param="bootstrap")
    seed: int = option(0, "bootstrap seed", minimum=0)
    require_improvement: float = option(
        0.0, "quality gate: minimum relative improvement of the tuned model in the champion metric, in its good "
             "direction (a perplexity drop, a ROUGE-L gain), e.g. 0.05 (0: no gate)",
        minimum=0, exclusive_maximum=1, param="require_improvement")
    shared: str = option("", "the run's shared folder for this stage: the base model's evaluation is computed once "
                             "there and reused by every candidate and rerun (empty: computed here, not shared)",
                         upstream=SHARED)
    # The trigger form's default is the demo's: long enough that an answer which never stops shows as one.
    max_new_tokens: int = option(64, "answer tokens generated per eval prompt for the task metrics (0: no generation)",
                                 minimum=0, maximum=4096, param="max_new_tokens", dag_default=48)
    generation_examples: int = option(0, "generate answers to at most this many eval examples (0: every scored one)",
                                      minimum=0, param="generation_examples")
    generation_batch_size: int = option(64, "prompts per generation batch (at most; batches are evened out)", minimum=1,
                                        maximum=1024)
    temperature: float = option(0.0, "0: greedy answers; > 0: top-p sampling at this temperature, seeded by --seed",
                                minimum=0, maximum=5, param="generation_temperature")
    top_p: float = option(0.95, "nucleus of top-p sampling (with --temperature > 0)", exclusive_minimum=0, maximum=1)
    eval_tasks: str = option("", "lm-evaluation-harness tasks run on the Keras models, comma-separated: task names, or "
                                 "YAML task files (local or gs://) whose data files are local or gs://",
                             param="eval_tasks", nullable=True)
    eval_task_limit: int = option(0, "at most this many documents per lm-evaluation-harness task (0: all)", minimum=0,
                                  param="eval_task_limit")
    champion_metric: str = option(AUTO, "the metric the champion is chosen and gated by: perplexity, exact_match, "
                                        "rouge_l, chrf, stop_rate, task:metric of an --eval-tasks task, or auto "
                                        "(rouge_l when answers are generated, else perplexity)", param="champion_metric")

    def __post_init__(self) -> None:
        spec.validate(self)
        if self.stride == 0:
            object.__setattr__(self, "stride", self.max_length // 2)
        if not 1 <= self.stride <= self.max_length - 1:
            raise BadInputError("--stride", self.stride, f"an integer in [1, max-length - 1 = {self.max_length - 1}]")
        check_champion_metric(self.champion_metric, self.tasks)
        if self.champion_metric in ("exact_match", "rouge_l", "chrf", "stop_rate") and not self.max_new_tokens:
            raise BadInputError("--champion-metric", self.champion_metric, "a metric that is computed: generation is "
                                "off (--max-new-tokens 0), so perplexity or an --eval-tasks task:metric")
        if self.require_improvement and not self.finetune:
            raise BadInputError("--finetune", self.finetune, "the fine-tuning output prefix when --require-improvement is set")

    @property
    def tasks(self) -> tuple[str, ...]:
        return parse_tasks(self.eval_tasks)


def parse_tasks(value: str | None) -> tuple[str, ...]:
    """`--eval-tasks` as a tuple: comma-separated, blanks dropped, order kept, duplicates refused."""
    tasks = tuple(t.strip() for t in (value or "").split(",") if t.strip())
    if len(set(tasks)) != len(tasks):
        raise BadInputError("--eval-tasks", value, "each task once")
    return tasks


NO_FILTER = "none"  # lm-eval's filter name for unfiltered outputs


def task_metric_name(metric: str, filter_name: str) -> str:
    """The name an lm-eval result is reported under (and `--champion-metric task:NAME` names): lm-eval reports
    `metric,filter`; unfiltered results are the metric alone (`acc`), filtered ones `metric/filter`
    (`exact_match/strict-match`)."""
    return metric if filter_name == NO_FILTER else f"{metric}/{filter_name}"


def is_task_file(entry: str) -> bool:
    """A YAML task definition (named by its `task` key once read), not an lm-eval task name."""
    return entry.lower().endswith((".yaml", ".yml"))


def check_champion_metric(value: str, tasks: tuple[str, ...]) -> None:
    """Names the metric is one we compute; a `task:metric`'s task must be in `--eval-tasks` (whether the task produces
    that metric is checked when its definition is read: in the DAG's plan, and by the stage)."""
    if value == AUTO or value in METRICS:
        return
    task, sep, metric = value.partition(":")
    if not sep or not task or not metric:
        raise BadInputError("--champion-metric", value, f"one of {AUTO}, {', '.join(METRICS)} or task:metric of an "
                            "--eval-tasks task")
    if not tasks:
        raise BadInputError("--champion-metric", value, "a task of --eval-tasks, which is empty")
    if not any(is_task_file(t) for t in tasks) and task not in tasks:
        raise BadInputError("--champion-metric", value, f"task:metric with a task of --eval-tasks ({', '.join(tasks)})")


def improvement(base: float, tuned: float, higher_is_better: bool) -> float:
    """The tuned model's relative improvement in a metric's good direction (a perplexity drop, a ROUGE-L gain): what
    `--require-improvement` gates, in the stage and in the DAG's `select`. From a base of 0 any gain is unbounded."""
    gain = (tuned - base) if higher_is_better else (base - tuned)
    if base == 0:
        return 0.0 if gain == 0 else float("inf") if gain > 0 else float("-inf")
    return gain / abs(base)
