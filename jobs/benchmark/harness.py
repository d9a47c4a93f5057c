"""lm-evaluation-harness on a keras-hub causal LM: the `keras-hub` model backend and `run_tasks`.

`KerasHubLM` answers lm-eval's three request types as lm-eval's own Hugging Face backend (HFLM) does for a
Gemma checkpoint, so a Keras model and its transformers export score alike (tests/jobs/benchmark/test_harness.py):
sequences start with BOS (Gemma's tokenizer adds it in HFLM; keras-hub's does not, so it is added here), a
context's trailing whitespace moves to the continuation, the continuation is what encoding context + continuation
adds past the context's tokens, and a sequence keeps its last `max_length + 1` tokens.

Metric names. lm-eval reports `"<metric>,<filter>"` (`"acc,none"`, `"exact_match,strict-match"`). A metric
computed on unfiltered outputs (filter `none`) is named by the metric alone (`acc`); a filtered one is
`<metric>/<filter>` (`exact_match/strict-match`). The DAG's plan predicts the same names from the task
definitions (dags/gemma_pipeline/plan/eval_tasks.py); the tests hold the two to each other.

Task files. A YAML task is loaded here with lm-eval's own loader (its `include` and `!function` resolve next to
the file), its `dataset_kwargs.data_files` made absolute against the YAML's own directory (lm-eval would resolve
them against the working directory) and gs:// data files staged in, and it is handed to lm-eval as an inline
config: nothing is rewritten on disk. A gs:// YAML is staged alone, so it must be self-contained (no `include`, no
`!function`).
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import lm_eval
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from jobs import families
from jobs.benchmark import generation
from jobs.common import models, storage
from jobs.contract.configs.benchmark import is_task_file, task_metric_name
from jobs.contract.errors import BadInputError

FIELD = "--eval-tasks"
LENGTH_STEP = 16  # batch widths (and scored positions) round up to a multiple of this: few compiled shapes
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say
BOOTSTRAP_ITERS = 1000  # lm-eval's mean-type metrics have closed-form stderrs; this bounds the others' cost


metric_name = task_metric_name  # the one naming rule, shared with the benchmark stage


def _round_up(n: int, step: int = LENGTH_STEP) -> int:
    return max(step, -(-n // step) * step)


@register_model("keras-hub")
class KerasHubLM(LM):
    """An lm-eval model over an already-loaded keras-hub CausalLM, or one loaded from `pretrained` (a preset
    directory or any model URI the stages accept, e.g. `demo:gemma3-270m`). `device` and `max_batch_size`,
    which lm-eval passes every backend, are accepted and unused: JAX places the arrays."""

    def __init__(self, model: Any = None, batch_size: int | str = 8, max_length: int | str | None = None,
                 seed: int | str = 0, pretrained: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if model is None:
            if not pretrained:
                raise BadInputError("pretrained", pretrained, "a keras-hub preset directory or model URI")
            with tempfile.TemporaryDirectory(prefix="keras-hub-lm-") as workdir:  # weights are in memory once loaded
                model = models.load_causal_lm(str(pretrained), Path(workdir), field="pretrained")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise BadInputError("batch_size", batch_size, "a positive integer (a fixed batch keeps compiled shapes few)")
        self.model = model
        self.tokenizer = model.preprocessor.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.preprocessor.sequence_length)
        self.seed = int(seed)
        self._bos = int(self.tokenizer.start_token_id)
        self._stop_ids = (int(self.tokenizer.end_token_id), models.end_of_turn_id(self.tokenizer))
        self._score_fn = None  # jitted once per instance (per model); traced once per (batch width, scored width)

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.score_pairs([tuple(r.args) for r in requests])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation given the context, whether it is the greedy continuation)."""
        return self.score_tokens(self.encode_pairs(pairs))

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(BOS + context tokens, continuation tokens) per pair, split as lm-eval's causal backends split them."""
        contexts = self._encode([c.rstrip() for c, _ in pairs])
        wholes = self._encode([c + x for c, x in pairs])
        return [([self._bos, *ctx], whole[len(ctx):]) for ctx, whole in zip(contexts, wholes)]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood: BOS conditions the first token, windows of `max_length` tokens each
        condition on the tokens before them, disjointly scored."""
        windows, owners = [], []
        for owner, tokens in enumerate(self._encode([r.args[0] for r in requests])):
            for window in get_rolling_token_windows(token_list=tokens, prefix_token=self._bos,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score_tokens(windows)):
            totals[owner] += logprob
        return totals

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [[int(t) for t in ids] for ids in self.tokenizer(list(texts))] if texts else []

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """`score_pairs` of already-tokenized (context, continuation) pairs."""
        # Each sequence keeps its last max_length + 1 tokens: max_length inputs, each predicting the next.
        rows = []
        for context, continuation in pairs:
            full = (context + continuation)[-(self.max_length + 1):]
            rows.append((full, min(len(continuation), len(full) - 1)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        state = self._state()
        # Longest first, as lm-eval does: a batch that does not fit fails at once, not at the end.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin: begin + self.batch_size]
            totals, greedy = self._scorer()(*state, *self._batch([rows[i] for i in chunk]))
            totals, greedy = np.asarray(totals), np.asarray(greedy)
            for slot, i in enumerate(chunk):
                results[i] = (float(totals[slot]), bool(greedy[slot]))
        return results

    def _batch(self, rows: list[tuple[list[int], int]]) -> tuple[np.ndarray, ...]:
        """Fixed-size arrays: inputs right-padded to a width step, the positions whose next token is scored, those
        tokens, and which of them count. A short batch repeats its first row (ignored) rather than run an empty
        row, whose fully masked attention is not worth reasoning about."""
        width = _round_up(max(len(full) - 1 for full, _ in rows))
        scored = _round_up(max(count for _, count in rows))
        ids = np.zeros((self.batch_size, width), np.int32)
        mask = np.zeros((self.batch_size, width), bool)
        positions = np.zeros((self.batch_size, scored), np.int32)
        targets = np.zeros((self.batch_size, scored), np.int32)
        weights = np.zeros((self.batch_size, scored), bool)
        for slot in range(self.batch_size):
            full, count = rows[slot] if slot < len(rows) else rows[0]
            length = len(full) - 1
            ids[slot, :length] = full[:-1]
            mask[slot, :length] = True
            positions[slot, :count] = np.arange(length - count, length)
            targets[slot, :count] = full[len(full) - count:]
            weights[slot, :count] = True
        return ids, mask, positions, targets, weights

    def _state(self) -> tuple[list, list]:
        # Read at every call, so weights assigned after construction (another adapter) are the ones scored.
        backbone = self.model.backbone
        return [v.value for v in backbone.trainable_variables], [v.value for v in backbone.non_trainable_variables]

    def _scorer(self):
        """The jitted scoring step. keras-hub's Gemma CausalLMs compute logits as the backbone's hidden states
        through its tied embedding in reverse; this runs the backbone on every position but that head (the
        262k-word vocabulary costs more per position than the whole 270M body) only on the scored positions:
        a multiple-choice request scores a few tokens after a long context. Log-softmax is in float32."""
        if self._score_fn is not None:
            return self._score_fn
        import jax
        import jax.numpy as jnp

        backbone = self.model.backbone
        family = families.of_model(backbone)
        embedding = backbone.token_embedding
        where = {id(v): i for i, v in enumerate([*backbone.trainable_variables, *backbone.non_trainable_variables])}
        head_trainable = [where[id(v)] for v in embedding.trainable_variables]
        head_frozen = [where[id(v)] for v in embedding.non_trainable_variables]

        def score(trainable, non_trainable, ids, mask, positions, targets, weights):
            hidden, _ = backbone.stateless_call(trainable, non_trainable, family.backbone_inputs(ids, mask))
            picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)
            values = [*trainable, *non_trainable]
            logits, _ = embedding.stateless_call([values[i] for i in head_trainable], [values[i] for i in head_frozen],
                                                 picked, reverse=True)
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            chosen = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
            total = jnp.sum(jnp.where(weights, chosen, 0.0), axis=-1)
            greedy = jnp.all((jnp.argmax(log_probs, axis=-1) == targets) | ~weights, axis=-1)
            return total, greedy

        self._score_fn = jax.jit(score)
        return self._score_fn

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Answers with the batched generator, one sampler per distinct gen_kwargs; each answer is cut at its
        first `until` string, as HFLM cuts (the stop tokens, EOS and end of turn, are never in the text)."""
        results = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            answers = self.generate_tokens([requests[i].args[0] for i in indices], gen_kwargs)
            until = [u for u in normalize_gen_kwargs(dict(gen_kwargs))["until"] if isinstance(u, str) and u]
            for i, ids in zip(indices, answers):
                text = str(self.tokenizer.detokenize(ids)) if ids else ""
                results[i] = postprocess_generated_text(text, until, None)
        return results

    def generate_tokens(self, contexts: Sequence[str], gen_kwargs: dict[str, Any]) -> list[list[int]]:
        """Each context's answer ids (stop token excluded) under one request's gen_kwargs: greedy unless it
        samples (`do_sample`, a temperature, `top_p`; seeded), at most `max_gen_toks`; a prompt keeps BOS and its
        last max_length - max_gen_toks tokens."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
        new_tokens = int(kwargs["max_gen_toks"])
        if new_tokens >= self.max_length:
            raise BadInputError("max_gen_toks", new_tokens, f"fewer than max_length ({self.max_length}) tokens, "
                                "leaving room for the prompt")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        generation.configure(self.model, temperature, float(kwargs.get("top_p") or 1.0), self.seed)
        prompts = generation.prompt_ids(self.tokenizer, list(contexts), self.max_length - new_tokens)
        return generation.generate(self.model, prompts, new_tokens, self._stop_ids, self.batch_size,
                                   int(self.tokenizer.pad_token_id)).tokens


# ---------------------------------------------------------------------- tasks


def run_tasks(model: Any, tasks: tuple[str, ...], workdir: Path, *, batch_size: int, max_length: int,
              limit: int | None = None, seed: int = 0,
              bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, dict[str, dict[str, float | None]]]:
    """Run lm-eval `tasks` (names, or YAML task files local or gs://) on a keras-hub CausalLM:
    {task or group: {metric name: {"value", "stderr"}}}, every task and group lm-eval reports a metric for.
    `limit`: at most that many documents per task (None or 0: all)."""
    specs, manager = resolve_tasks(tasks, workdir)
    lm = KerasHubLM(model, batch_size=batch_size, max_length=max_length, seed=seed)
    evaluated = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit or None,
                                        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed,
                                        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    return summarize(evaluated["results"], evaluated.get("higher_is_better") or {})


def resolve_tasks(tasks: Sequence[str], workdir: Path) -> tuple[list[str | dict[str, Any]], Any]:
    """What `simple_evaluate` is given for `tasks`: names as they are and task files as inline configs (module
    docstring), with a TaskManager that knows lm-eval's own tasks when any is named. Refuses (exit 2) an unknown
    name, and a task file that is missing, does not parse or defines no single task."""
    from lm_eval.tasks import TaskManager

    specs = [_task_spec(entry, workdir / "eval_tasks" / f"{i:02d}") for i, entry in enumerate(tasks)]
    names = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_defaults=bool(names))  # indexing lm-eval's own tasks takes seconds: only if named
    _check_names(names, manager.all_tasks)
    return specs, manager


def summarize(results: dict[str, dict[str, Any]],
              higher: dict[str, dict[str, bool]] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """lm-eval's `results` under our metric names, each with its direction (lm-eval's `higher_is_better`, True when
    it states none) and a normal-approximation 95% interval (value ± 1.96 standard errors); a stderr lm-eval did not
    compute (or could not: one document) is None, and so is the interval."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, values in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            finite = isinstance(stderr, (int, float)) and math.isfinite(stderr)
            err = float(stderr) if finite else None
            metrics[metric_name(metric, filter_name)] = {
                "value": float(value), "stderr": err,
                "ci95_low": None if err is None else float(value) - 1.96 * err,
                "ci95_high": None if err is None else float(value) + 1.96 * err,
                "higher_is_better": bool(((higher or {}).get(task) or {}).get(metric, True))}
        if metrics:
            out[task] = metrics
    return out


def _check_names(names: Iterable[str], known: Sequence[str]) -> None:
    known_set = set(known)
    for name in names:
        if name not in known_set:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else ""
            raise BadInputError(FIELD, name, "an lm-evaluation-harness task, group or tag name, or a .yaml task file",
                                hint)


def _task_spec(entry: str, staging: Path) -> str | dict[str, Any]:
    """A task name as is; a YAML task file as lm-eval's inline config, with its data files resolved."""
    if not is_task_file(entry):
        return entry
    local = _stage(entry, staging)
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own: `include` and `!function` as lm-eval reads them

    try:
        config = load_yaml(local, resolve_func=True)
    except Exception as err:  # a YAML error, a missing include, a function that does not import: all the file's fault
        raise BadInputError(FIELD, entry, "an lm-evaluation-harness task YAML", f"{type(err).__name__}: {err}") from err
    if not isinstance(config.get("task"), str) or "group" in config or "class" in config:
        raise BadInputError(FIELD, entry, "a task YAML with a `task` name (one task: not a group or a Python class)")
    base = entry.rsplit("/", 1)[0] if storage.is_gcs(entry) else str(local.resolve().parent)
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _data_files(kwargs["data_files"], base, staging / "data", entry)}
    return config


def _stage(uri: str, staging: Path) -> Path:
    try:
        return storage.stage_in(uri, staging)
    except BadInputError as err:
        raise BadInputError(FIELD, uri, "an existing task YAML file", str(err)) from err


def _data_files(files: Any, base: str, staging: Path, entry: str) -> Any:
    """`data_files` (a path, a list, or a split → path(s) mapping) with each path absolute and local: relative
    ones against the YAML's directory (gs:// or local), gs:// ones staged in; URLs of other schemes as given."""
    counter = itertools.count()

    def one(path: Any) -> Any:
        if not isinstance(path, str):
            raise BadInputError(FIELD, entry, "dataset_kwargs.data_files as a path, a list or a split → path mapping")
        if "://" in path and not storage.is_gcs(path):
            return path  # hf://, https://: the datasets library fetches these itself
        if not storage.is_gcs(path) and not Path(path).is_absolute():
            path = f"{base}/{path}" if storage.is_gcs(base) else str(Path(base, path))
        if storage.is_gcs(path):
            target = staging / f"{next(counter):03d}"
            try:
                return str(storage.stage_in(path, target, PurePosixPath(path).name))
            except BadInputError as err:
                raise BadInputError(FIELD, entry, "data files that exist", str(err)) from err
        return path

    if isinstance(files, dict):
        return {split: [one(p) for p in paths] if isinstance(paths, list) else one(paths) for split, paths in files.items()}
    return [one(p) for p in files] if isinstance(files, list) else one(files)
