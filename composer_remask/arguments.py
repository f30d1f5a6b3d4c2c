"""One argument check for the Python API and the recipes: a value must have its parameter's type.

The recipes (YAML) and ``ReMask(...)`` in Python check their arguments against the same type hints
with :func:`check_type`, so a value is never reinterpreted: ``"False"`` is not a bool, ``0.5`` is
not an int, ``True`` is not a number. Ranges are the callee's (``checks.finite_number`` for floats).
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

__all__ = ["check_type", "check_arguments"]


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:  # numpy integers too; never a bool
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:  # any real number (an int is a float's value); never a bool
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, Sequence, typing.Sequence, set):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return not args or all(_matches(item, args[0]) for item in value)
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    # Classes a YAML value cannot be (devices, object stores, Time, ...): the callee converts or
    # rejects them itself, so do not second-guess it here.
    return True


def check_type(value: Any, annotation: Any) -> str | None:
    """``None`` if ``value`` fits ``annotation``, else a message like ``expected int, got 'x' (str)``."""
    if _matches(value, annotation):
        return None
    return f"expected {_describe(annotation)}, got {value!r} ({type(value).__name__})"


def check_arguments(function: Callable[..., Any], values: Mapping[str, Any], owner: str) -> None:
    """Raise ``TypeError`` naming ``owner`` and the parameter for the first value of ``values``
    (argument name -> value, e.g. a constructor's ``locals()``) that does not fit its type hint."""
    hints = typing.get_type_hints(function)
    for name in inspect.signature(function).parameters:
        if name in values and name in hints:
            problem = check_type(values[name], hints[name])
            if problem:
                raise TypeError(f"{owner}: {name} {problem}")
