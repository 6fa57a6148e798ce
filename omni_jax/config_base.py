"""StrictConfig: the shared base of the frozen config dataclasses, plus their tiny validators.

Every module config is `@dataclasses.dataclass(frozen=True) class XConfig(StrictConfig)`:
`from_dict` accepts a dict or an ml_collections ConfigDict and rejects unknown keys (typos must
not pass), `to_dict` / `replace` round-trip. Subclasses that need to reshape the dict before
construction (nested configs, lists -> tuples) override the `_coerce` hook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import ml_collections

_C = TypeVar("_C", bound="StrictConfig")


def plain_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow dict copy of `d`; a ConfigDict becomes nested plain dicts (`.to_dict()`)."""
    return d.to_dict() if isinstance(d, ml_collections.ConfigDict) else dict(d)


def check_keys(who: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """ValueError naming every key of `keys` outside `known` (and listing the known ones)."""
    known = set(known)
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"{who}: unknown keys {unknown}; expected a subset of {sorted(known)}")


def check_positive(who: str, **values: int | float | None) -> None:
    """ValueError '<who>.<name> must be positive, got <v>' for the first value that is not."""
    for name, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{who}.{name} must be positive, got {v!r}")


def check_choice(who: str, name: str, value: str, choices: Sequence[str]) -> None:
    """ValueError '<who>.<name>: unknown value ...' unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{who}.{name}: unknown value {value!r}; expected one of {tuple(choices)}")


class StrictConfig:
    """Mixin for frozen config dataclasses: strict `from_dict`, `to_dict`, `replace`."""

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """Build from a dict / ConfigDict; unknown keys are an error (typos must not pass)."""
        d = plain_dict(d)
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        check_keys(cls.__name__, d, known)
        return cls(**cls._coerce(d))

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Hook: reshape the (key-checked) dict before `cls(**d)`; identity by default."""
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: _C, **kw: Any) -> _C:
        return dataclasses.replace(self, **kw)  # type: ignore[type-var]
