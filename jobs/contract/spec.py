"""One declaration per stage option. A stage config is a frozen dataclass whose fields are `option(...)`s; the
CLI (flags, help, defaults), the stage's own validation, the DAG's Params (type, bounds, enum, description,
default) and the Job's arguments are all derived from it, so adding a knob is one edit in one config.

Standard library only: the DAG imports this at parse time on Composer.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from jobs.contract.errors import BadInputError

_UNSET: Any = dataclasses.MISSING


class _NoDagDefault:
    def __repr__(self) -> str:
        return "<same as the CLI default>"


SAME_AS_CLI: Any = _NoDagDefault()
# `upstream=SHARED`: the DAG fills the option with the run's shared folder of the option's own stage (what one stage
# computes once per run for every candidate); `jobs.contract.layout` places it.
SHARED = "shared"
Kind = Literal["int", "float", "str", "bool", "tuple"]


def option(default: Any = _UNSET, help: str = "", *, minimum: float | None = None, maximum: float | None = None,
           exclusive_minimum: float | None = None, exclusive_maximum: float | None = None,
           param: str | None = None, dag_default: Any = SAME_AS_CLI, nullable: bool = False,
           upstream: str | None = None) -> Any:
    """A config field with its help text and bounds.

    `param` names the DAG Param whose value the Job passes for this option (several stages may share one);
    `dag_default` is the trigger form's default when it must differ from the CLI's (the demo's step count);
    `nullable` marks an optional string whose "" means "none" (the form shows it as an optional field);
    `upstream` marks a prefix the DAG fills with another stage's output ("self": this stage's own output).
    """
    if not help:
        raise ValueError("option: help text is required (it is the CLI help and the trigger form's description)")
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum,
                "exclusive_maximum": exclusive_maximum, "param": param, "dag_default": dag_default,
                "nullable": nullable, "upstream": upstream}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    name: str
    kind: Kind
    default: Any
    required: bool
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    param: str | None = None
    dag_default: Any = SAME_AS_CLI
    nullable: bool = False
    upstream: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def param_default(self) -> Any:
        value = self.default if self.dag_default is SAME_AS_CLI else self.dag_default
        return None if self.nullable and value == "" else value

    def expected(self) -> str:
        """What a valid value looks like, in words (for error messages and help)."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        noun = {"int": "an integer", "float": "a number"}.get(self.kind, "a value")
        low = self.minimum if self.minimum is not None else self.exclusive_minimum
        high = self.maximum if self.maximum is not None else self.exclusive_maximum
        if low is not None and high is not None:
            left = "[" if self.minimum is not None else "("
            right = "]" if self.maximum is not None else ")"
            return f"{noun} in {left}{_fmt(low)}, {_fmt(high)}{right}"
        if low is not None:
            return f"{noun} {'>=' if self.minimum is not None else '>'} {_fmt(low)}"
        if high is not None:
            return f"{noun} {'<=' if self.maximum is not None else '<'} {_fmt(high)}"
        return noun

    def violates(self, value: Any) -> bool:
        if self.choices:
            return value not in self.choices
        if self.kind not in ("int", "float"):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return True
        return ((self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)
                or (self.exclusive_minimum is not None and value <= self.exclusive_minimum)
                or (self.exclusive_maximum is not None and value >= self.exclusive_maximum))

    def json_schema(self) -> dict[str, Any]:
        """The DAG Param's JSON schema (Airflow validates the trigger form and `-c` conf with it)."""
        json_type = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}[self.kind]
        schema: dict[str, Any] = {"type": ["null", json_type] if self.nullable else json_type,
                                  "description": self.help}
        if self.choices:
            schema["enum"] = list(self.choices)
        for key, value in (("minimum", self.minimum), ("maximum", self.maximum),
                           ("exclusiveMinimum", self.exclusive_minimum), ("exclusiveMaximum", self.exclusive_maximum)):
            if value is not None:
                schema[key] = value
        if json_type == "string" and not self.nullable and not self.choices:
            schema["minLength"] = 1
        return schema


def _fmt(value: float) -> str:
    return f"{value:g}"


def _kind(hint: Any) -> tuple[Kind, tuple[str, ...]]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "str", tuple(typing.get_args(hint))
    if origin is tuple:
        return "tuple", ()
    names: dict[Any, Kind] = {int: "int", float: "float", str: "str", bool: "bool"}
    if hint not in names:
        raise TypeError(f"option type {hint!r} is not supported (int, float, str, bool, Literal[...], tuple[str, ...])")
    return names[hint], ()


def options(config_cls: type) -> list[Option]:
    """Every option of a stage config, in declaration order."""
    hints = typing.get_type_hints(config_cls)
    found = []
    for f in dataclasses.fields(config_cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            raise TypeError(f"{config_cls.__name__}.{f.name}: declare it with spec.option(...)")
        kind, choices = _kind(hints[f.name])
        required = f.default is dataclasses.MISSING
        found.append(Option(name=f.name, kind=kind, default=None if required else f.default, required=required,
                            choices=choices, **meta))
    return found


def validate(config: Any) -> None:
    """Check every option's declared choices and bounds; exit-2 errors name the flag, value and expectation."""
    for opt in options(type(config)):
        value = getattr(config, opt.name)
        if opt.required and value in (None, ""):
            raise BadInputError(opt.flag, value, f"a value ({opt.help})")
        if opt.violates(value):
            raise BadInputError(opt.flag, value, opt.expected())
