"""A read-only record: what ``@dataclass(frozen=True)`` gives, without it.

``dataclasses`` imports ``inspect``: 7 ms of every ``pyxl sim`` command, whose
whole budget is 30.  The fields are the class's annotations, in order; a field
with a class-level value is optional, with that default.

Imports nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Tuple


class Record:
    def __init__(self, *args: Any, **kw: Any) -> None:
        names = self._fields()
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} fields, "
                            f"got {len(args)}")
        values = dict(zip(names, args))
        for name in kw:
            if name not in names or name in values:
                raise TypeError(f"{type(self).__name__}() got an unexpected or repeated "
                                f"field {name!r}")
        values.update(kw)
        for name in names:
            if name in values:
                value = values[name]
            elif hasattr(type(self), name):
                value = getattr(type(self), name)
            else:
                raise TypeError(f"{type(self).__name__}() is missing field {name!r}")
            object.__setattr__(self, name, value)

    @classmethod
    def _fields(cls) -> Tuple[str, ...]:
        names: Dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            names.update(dict.fromkeys(klass.__dict__.get("__annotations__", {})))
        return tuple(names)

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self._fields())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields())
        return f"{type(self).__name__}({inner})"

    def to_json(self) -> Dict[str, Any]:
        return {n: getattr(self, n) for n in self._fields()}
