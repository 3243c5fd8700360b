"""Command-line flags made from a pydantic config model: one flag per field (`max_running` ->
`--max-running`), its help the field's description, its default the model's (flags left out are
left to the model), so a default is written once, in the model."""

from __future__ import annotations

import argparse
import types
import typing

from pydantic import BaseModel


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    for name, field in model.model_fields.items():
        ann = field.annotation
        choices = [a for a in typing.get_args(ann) if a is not type(None)]
        if typing.get_origin(ann) in (typing.Union, types.UnionType) and choices:
            ann = choices[0]
        kw: dict = {"dest": name, "default": None, "help": f"{field.description} (default: {field.default})"}
        if typing.get_origin(ann) is typing.Literal:
            values = typing.get_args(ann)
            kw |= {"choices": list(values), "type": type(values[0])}
        elif ann is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif ann in (int, float, str):
            kw["type"] = ann
        else:
            continue  # structured fields are for deploy.yaml
        parser.add_argument("--" + name.replace("_", "-"), **kw)


def given(ns: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The fields set on the command line."""
    return {name: getattr(ns, name) for name in model.model_fields if getattr(ns, name, None) is not None}
