"""The ``NAME:key=value,key=value`` syntax shared by the command line (``--recipes``) and study files
(recipes and attacks): one parser, so both read a value the same way."""
from __future__ import annotations

from typing import Any

__all__ = ["parse_value", "parse_options"]


def parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, ``none`` -> None, then int, then float, else the text itself."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_options(spec: str, what: str, error: type[Exception] = ValueError) -> tuple[str, dict[str, Any]]:
    """``"pgd:eps=0.1,steps=10"`` -> ``("pgd", {"eps": 0.1, "steps": 10})``; an item without ``=``
    raises ``error`` naming ``what`` (e.g. "recipe", "attack")."""
    name, _, args = spec.strip().partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise error(f"{what} argument {item!r} in {spec!r} is not of the form key=value")
        kwargs[key.strip()] = parse_value(value.strip())
    return name, kwargs
