"""Whether a value has a type hint's type, for refusing a bad profile field with a useful message."""

from __future__ import annotations

import types
import typing


def type_name(hint) -> str:
    plain = typing.get_origin(hint) is None and isinstance(hint, type)
    return hint.__name__ if plain else str(hint).replace("NoneType", "None")


def fits(value, hint) -> bool:
    """Whether ``value`` has the annotated type: an int passes for a float, a bool only for a bool."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(fits, value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def list_hint(value, hint) -> str:
    """What to write instead, where a list is expected."""
    if typing.get_origin(hint) is not tuple:
        return ""
    if isinstance(value, str):
        return ' (a list such as ["a", "b"], not a string)'
    args = typing.get_args(hint)
    if isinstance(value, tuple) and Ellipsis not in args and len(value) != len(args):
        return f" (exactly {len(args)} values, not {len(value)})"
    return ""


def floats_in(value) -> list:
    return [x for x in (value if isinstance(value, tuple) else (value,)) if isinstance(x, float)]
