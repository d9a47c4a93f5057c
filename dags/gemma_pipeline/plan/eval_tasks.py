"""Plan-time checks of the `eval_tasks` and `champion_metric` params, on the Airflow worker (no lm-eval there).

What each task will report, under the benchmark's metric names (jobs/benchmark/harness.py): lm-eval reports
`"<metric>,<filter>"`; unfiltered results (filter `none`) are named by the metric alone (`acc`), filtered ones
`<metric>/<filter>` (`exact_match/strict-match`). `champion_metric` `task:metric` must name one of them.

What is checked where:
- A YAML task file (local or gs://, read through the DAG's reader) is parsed here, its `include`s followed: it
  must define one `task` with an `output_type` of lm-eval's, and its metrics come from `metric_list` (lm-eval's
  defaults for the output type without one) times the names in `filter_list`. Whether its data files exist and
  its templates render is found when the benchmark runs it.
- A task name is looked up in lm_eval_tasks.json, generated from lm-eval's default TaskManager (`python -m
  gemma_pipeline.tools.generate write lm_eval_tasks`, in the dev environment, which has lm-eval): every YAML task
  with its metrics, every group with its members and aggregate metrics, every tag with its tasks, and lm-eval's
  default metrics per output type. A task defined by a Python class (squadv2, scrolls_*, the unitxt tasks) names
  its metrics in code: the index knows it exists, not its metrics, so `metrics_of` gives it () and a
  `task:metric` of it is checked only when the benchmark runs.
"""

from __future__ import annotations

import difflib
import functools
import json
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from jobs.contract.configs.benchmark import NO_FILTER, is_task_file, parse_tasks, task_metric_name
from jobs.contract.errors import BadInputError

INDEX = Path(__file__).resolve().with_name("lm_eval_tasks.json")
DEFAULT_OUTPUT_TYPE = "generate_until"  # lm-eval's TaskConfig default, for its own tasks that leave it out
MAX_INCLUDE_DEPTH = 8

Reader = Callable[[str], bytes]


metric_name = task_metric_name  # the one naming rule, shared with the benchmark stage


def parse(value: str | None) -> tuple[str, ...]:
    """The `eval_tasks` param as a tuple: comma-separated task names and .yaml/.yml task files; empty: ()."""
    try:
        return parse_tasks(value)
    except BadInputError as err:
        raise ValueError(f"eval_tasks: {err}") from None


def metrics_of(tasks: tuple[str, ...], read: Reader) -> dict[str, tuple[str, ...]]:
    """{task or group name: the metric names it reports} for every task and group `tasks` will report: a YAML
    file's task; a named task; a group's own aggregates and, recursively, its members'; a tag's tasks."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in tasks:
        if is_task_file(entry):
            name, metrics = _file_metrics(entry, read)
            out[name] = metrics
        else:
            out.update(_named_metrics(entry))
    return out


def check_metric(champion_metric: str, tasks_metrics: dict[str, tuple[str, ...]]) -> None:
    """A `task:metric` champion metric names a task of `tasks_metrics` and a metric that task reports. Plain
    metric names (perplexity, exact_match, …) are the benchmark config's to check."""
    task, sep, metric = champion_metric.partition(":")
    if not sep:
        return
    if task not in tasks_metrics:
        have = ", ".join(sorted(tasks_metrics)) or "none: eval_tasks is empty"
        raise ValueError(f"champion_metric: got {champion_metric!r}; expected task:metric with a task that eval_tasks "
                         f"reports ({have})")
    known = tasks_metrics[task]
    if known and metric not in known:
        raise ValueError(f"champion_metric: got {champion_metric!r}; expected a metric {task} reports: "
                         f"{', '.join(known)}")


# ---------------------------------------------------------------------- task files


class _Function(str):
    """A `!function module.name` reference, kept as its text: a metric given as a function is named after it."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def _file_metrics(uri: str, read: Reader) -> tuple[str, tuple[str, ...]]:
    config = _load(uri, read, depth=0)
    name, output_type = config.get("task"), config.get("output_type")
    if not isinstance(name, str) or "group" in config or "class" in config:
        raise ValueError(f"eval_tasks: {uri} defines no single task; expected a YAML with a `task` name (one task: "
                         "not a group or a Python class)")
    defaults = _index()["default_metrics"]
    if output_type not in defaults:
        raise ValueError(f"eval_tasks: {uri} has output_type {output_type!r}; expected one of {', '.join(defaults)}")
    try:
        return name, tuple(metric_name(m, f) for m, f in config_pairs(config, defaults))
    except (TypeError, KeyError, AttributeError) as err:
        raise ValueError(f"eval_tasks: {uri}: metric_list and filter_list must be lists of mappings, each metric "
                         f"with a `metric` and each filter with a `name` ({type(err).__name__}: {err})") from None


def _load(uri: str, read: Reader, depth: int) -> dict[str, Any]:
    """The YAML as lm-eval reads it: its `include`s first (paths relative to the file), its own keys winning."""
    try:
        text = read(uri)
    except Exception as err:  # the DAG's reader: a missing file or object, a refused permission, a bad URI
        raise ValueError(f"eval_tasks: {uri} cannot be read: {type(err).__name__}: {err}") from None
    try:
        config = yaml.load(text, Loader=_Loader)  # a SafeLoader that only adds !function, as text
    except yaml.YAMLError as err:
        raise ValueError(f"eval_tasks: {uri} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"eval_tasks: {uri} holds a {type(config).__name__}; expected a mapping of task settings")
    includes = config.pop("include", None)
    if includes is None:
        return config
    if depth >= MAX_INCLUDE_DEPTH:
        raise ValueError(f"eval_tasks: {uri} includes files more than {MAX_INCLUDE_DEPTH} deep (a cycle?)")
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        included = _load(_beside(uri, str(include)), read, depth + 1)
        included.pop("task_list", None)
        merged.update(included)
    return {**merged, **config}


def _beside(uri: str, relative: str) -> str:
    if relative.startswith("gs://") or posixpath.isabs(relative):
        return relative
    if uri.startswith("gs://"):
        return "gs://" + posixpath.normpath(posixpath.join(posixpath.dirname(uri[len("gs://"):]), relative))
    return str(Path(uri).parent / relative)


def config_pairs(config: dict[str, Any], defaults: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(metric, filter) of every result a task config reports, as lm-eval forms them: each metric of
    `metric_list` (or the output type's defaults) under each filter of `filter_list` (or `none`)."""
    metric_list = config.get("metric_list")
    if metric_list is None:
        metrics = list(defaults[config.get("output_type") or DEFAULT_OUTPUT_TYPE])
    else:
        metrics = [_metric(item["metric"]) for item in metric_list]
    filter_list = config.get("filter_list")
    filters = [NO_FILTER] if filter_list is None else [str(item["name"]) for item in filter_list]
    return [(m, f) for f in filters for m in metrics]


def _metric(value: Any) -> str:
    """A metric's name; one given as a function (`!function utils.f`, or lm-eval's unresolved path to it) is
    named after the function, as lm-eval names it."""
    if isinstance(value, _Function) or (isinstance(value, str) and "/" in value):
        return value.rsplit(".", 1)[-1]
    if not isinstance(value, str):
        raise TypeError(f"metric {value!r} is not a name")
    return value


# ---------------------------------------------------------------------- lm-eval's own tasks


@functools.cache
def _index() -> dict[str, Any]:
    return json.loads(INDEX.read_text())


def _named_metrics(name: str) -> dict[str, tuple[str, ...]]:
    index = _index()
    if name not in index["tasks"] and name not in index["groups"] and name not in index["tags"]:
        known = [*index["tasks"], *index["groups"], *index["tags"]]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"eval_tasks: got {name!r}; expected an lm-evaluation-harness {index['lm_eval_version']} task, "
                         f"group or tag name, or a .yaml/.yml task file{hint}")
    return dict(_expand(name, index, set()))


def _expand(name: str, index: dict[str, Any], seen: set[str], metric_set: int | None = None
            ) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(name, metrics) of `name` and everything under it; `metric_set` overrides a task's own (a group that
    changes its members' metrics)."""
    if name in seen:
        return
    seen.add(name)
    sets = index["metric_sets"]
    if name in index["tasks"]:
        own = metric_set if metric_set is not None else index["tasks"][name]
        yield name, tuple(sets[own]) if own is not None else ()
    elif name in index["groups"]:
        group = index["groups"][name]
        if group["metrics"] is not None:
            yield name, tuple(sets[group["metrics"]])
        for member in group["members"]:
            member_name, override = (member, None) if isinstance(member, str) else member
            yield from _expand(member_name, index, seen, override)
    else:
        for task in index["tags"].get(name, []):
            yield from _expand(task, index, seen)


def build_index() -> dict[str, Any]:
    """The index of lm-eval's default tasks. Needs lm-eval (the dev environment); imported here only."""
    from dataclasses import fields

    try:
        import lm_eval
    except ImportError as err:
        raise RuntimeError("the lm_eval_tasks index is generated from lm-eval's own tasks: install lm_eval (the dev "
                           "environment has it)") from err
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
    from lm_eval.config.group import GroupConfig
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    registry = TaskManager().task_index
    defaults = {k: list(v) for k, v in DEFAULT_METRIC_REGISTRY.items()}
    group_fields = {f.name for f in fields(GroupConfig)}
    sets: dict[tuple[str, ...], int] = {}

    def intern(pairs: list[tuple[str, str]]) -> int:
        return sets.setdefault(tuple(metric_name(m, f) for m, f in pairs), len(sets))

    pairs_of = {name: config_pairs(e.cfg, defaults) for name, e in registry.items() if e.kind == Kind.TASK}
    tasks: dict[str, int | None] = {name: intern(pairs) for name, pairs in pairs_of.items()}
    tasks |= {name: None for name, e in registry.items() if e.kind == Kind.PY_TASK}
    tags = {name: sorted(e.tags) for name, e in registry.items() if e.kind == Kind.TAG}
    groups: dict[str, dict[str, Any]] = {}

    def leaves(name: str, seen: set[str]) -> Iterator[str]:
        if name in seen:
            return
        seen.add(name)
        if name in pairs_of:
            yield name
        for member in [*groups.get(name, {}).get("members", []), *tags.get(name, [])]:
            yield from leaves(member if isinstance(member, str) else member[0], seen)

    def add_group(name: str, config: dict[str, Any]) -> None:
        overrides = {k: v for k, v in config.items() if k not in group_fields}
        members: list[str | list[Any]] = []
        listed = config.get("task") or []
        for item in listed if isinstance(listed, list) else [listed]:
            if isinstance(item, str):
                item = {"task": item}
            if isinstance(item.get("group"), str):
                if item["group"] not in registry and isinstance(item.get("task"), (list, str)):  # defined inline
                    add_group(item["group"], item)
                members.append(item["group"])
            elif isinstance(item.get("task"), str):
                member, changes = item["task"], {**overrides, **{k: v for k, v in item.items() if k != "task"}}
                base = registry.get(member)
                if changes and base is not None and base.kind == Kind.TASK:
                    own = intern(config_pairs({**base.cfg, **changes}, defaults))
                    members.append(member if own == tasks[member] else [member, own])
                else:
                    members.append(member)
        groups[name] = {"members": members, "metrics": None}
        aggregates = config.get("aggregate_metric_list")
        if aggregates:
            groups[name]["aggregates"] = aggregates if isinstance(aggregates, list) else [aggregates]

    for name, entry in registry.items():
        if entry.kind == Kind.GROUP:
            add_group(name, entry.cfg)
    for name, group in groups.items():  # aggregates last: a group without filters named takes its leaves'
        aggregates = group.pop("aggregates", None)
        if aggregates:
            found = [pair for leaf in leaves(name, set()) for pair in pairs_of[leaf]]
            pairs = []
            for item in aggregates:
                named = item.get("filter_list")
                filters = [named] if isinstance(named, str) else named or sorted({f for m, f in found if m == item["metric"]})
                pairs += [(item["metric"], f) for f in filters if (item["metric"], f) not in pairs]
            group["metrics"] = intern(pairs) if pairs else None
    return {"lm_eval_version": lm_eval.__version__, "default_metrics": defaults,
            "metric_sets": [list(s) for s in sets], "tasks": dict(sorted(tasks.items())),
            "groups": dict(sorted(groups.items())), "tags": dict(sorted(tags.items()))}


@functools.cache  # indexing lm-eval's tasks takes seconds; a check and a write in one process index once
def render_index() -> dict[str, str]:
    """lm_eval_tasks.json's text, for the generate tool: one task, group, tag or metric set a line, so a
    regeneration diffs by entry."""

    def compact(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))

    def block(value: Any) -> str:
        if isinstance(value, dict):
            return "{\n" + ",\n".join(f"{json.dumps(k)}: {compact(v)}" for k, v in value.items()) + "\n}"
        if isinstance(value, list):
            return "[\n" + ",\n".join(compact(v) for v in value) + "\n]"
        return compact(value)

    index = build_index()
    return {"": "{\n" + ",\n".join(f"{json.dumps(k)}: {block(v)}" for k, v in index.items()) + "\n}\n"}
