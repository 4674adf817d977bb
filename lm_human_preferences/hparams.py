"""Typed, nested hyperparameters with dotted overrides (after OpenAI's ``utils/hyperparams.py``).

Sections are ``@dataclass`` subclasses of :class:`HParams`.  Field types: ``int``, ``float``,
``str``, ``bool``, ``Literal[...]``, ``Optional[X]``/``X | None``, ``tuple[X, ...]``/``list[X]``
(comma-separated on the command line) and nested sections.  A field typed ``Optional[Sub]``
(default None) is an *on/off section*: ``--sub=on``/``--sub=off``; setting ``--sub.x=1`` while
it is off first turns it on with defaults::

    @dataclass
    class AdaptiveKLParams(HParams):
        target: float = 6.0
        horizon: int = 10000

        def _validate(self):  # optional hook, called by validate()
            if self.horizon <= 0:
                raise HParamsError("must be > 0", key="horizon")

    @dataclass
    class RewardsParams(HParams):
        kl_coef: float = 0.2
        adaptive_kl: Optional[AdaptiveKLParams] = None

    hp = RewardsParams()
    hp.override_from_args(["--adaptive_kl.target=3", "--kl_coef", "0.1"])
    hp.validate()
    hp.flat_items()  # {'kl_coef': 0.1, 'adaptive_kl.target': 3.0, 'adaptive_kl.horizon': 10000}

Each field's description (``--help``) is the comment at the end of its line, or the comment
lines right above it: the declaration is the one place that says what a field means
(``hparams_help.field_docs``, ``hparams_help.help_lines``).
validate() also refuses non-finite floats and ints beyond int64 in every field; sections state
the ranges of their own fields in ``_validate`` (``check_number``, ``check_count``).

String parsing: ints accept integral floats ("1e6" -> 1000000); bools accept
true/false/1/0/yes/no/on/off in any case; containers split on commas ("" -> empty).  For
Optional non-str fields "", "none", "None" and "null" mean None.  ``str`` fields keep the
string verbatim (``--task.start_text=`` sets ""); ``Optional[str]`` becomes None only for "None".
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

__all__ = ["HParams", "HParamsError", "MAX_COUNT", "check_count", "check_number", "loaded"]

T = TypeVar("T")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_NONE_STRINGS = {"", "none", "None", "null"}
# The most episodes, steps, labels or rows any count or size option takes: far beyond any run
# (the paper's longest: 5 * 10**6 episodes), so a larger value is a typo (an extra exponent).
MAX_COUNT = 2**40
_INT64 = 2**63


def check_number(hp: HParams, key: str, *, above: float | None = None, at_least: float | None = None,
                 at_most: float | None = None) -> None:
    """A finite `hp.<key>` within the bounds given, else an HParamsError saying which."""
    value = getattr(hp, key)
    bounds = [(above, f"> {above}", lambda v: v > above), (at_least, f">= {at_least}", lambda v: v >= at_least),
              (at_most, f"<= {at_most}", lambda v: v <= at_most)]
    wanted = [(text, test) for bound, text, test in bounds if bound is not None]
    if not (math.isfinite(value) and all(test(value) for _, test in wanted)):
        raise HParamsError(f"must be a finite number {' and '.join(text for text, _ in wanted)} (got {value})",
                           key=key)


def check_count(hp: HParams, key: str, *, at_least: int = 1, at_most: int = MAX_COUNT) -> None:
    """An integer `hp.<key>` within [at_least, at_most] (at most MAX_COUNT), else an HParamsError."""
    value = getattr(hp, key)
    if not at_least <= value <= at_most:
        most = "2**40" if at_most == MAX_COUNT else at_most
        raise HParamsError(f"must be an integer >= {at_least} and <= {most} (got {value})", key=key)


def loaded(load: Callable[[], T], *, key: str) -> T:
    """`load()` (a labeler, a judge, ... by name), its ValueError an HParamsError naming `key`; an
    HParamsError (a user's MODULE:FUNCTION that cannot be loaded) already names its key and passes."""
    try:
        return load()
    except HParamsError:
        raise
    except ValueError as e:
        raise HParamsError(str(e), key=key) from None


def _out_of_range(value: Any, tp: Any) -> str | None:
    """Why a value of a float or int field cannot be used anywhere: not finite, or beyond int64."""
    inner = _split_optional(tp)[0]
    if inner is float and isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if inner is int and isinstance(value, int) and not -_INT64 <= value < _INT64:
        return f"must be an integer between -2**63 and 2**63 - 1 (got {value})"
    return None


class HParamsError(ValueError):
    """A user error in hyperparameters.  ``_validate`` hooks raise ``HParamsError(problem,
    key=field_name)``; validate() completes the dotted key, giving e.g.
    ``invalid hyperparameter 'rewards.adaptive_kl.horizon': must be > 0``."""

    def __init__(self, message: str, key: str | None = None):
        self.message, self.key = message, key
        super().__init__(message if key is None else f"invalid hyperparameter '{key}': {message}")


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """Optional[X] / X | None -> (X, True); anything else -> (tp, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def _section_type(tp: Any) -> type[HParams] | None:
    inner = _split_optional(tp)[0]
    return inner if isinstance(inner, type) and issubclass(inner, HParams) else None


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be decorated with @dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key, including sections and keys inside (possibly off) sections."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if sec := _section_type(tp):
            keys += _all_keys(sec, f"{prefix}{name}.")
    return keys


def _unknown(key: str, keys: list[str]) -> HParamsError:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    if not close:  # e.g. 'noptepochs' -> 'ppo.noptepochs': match on the last dotted component
        leaves = {k.split(".")[-1] for k in keys}
        near = difflib.get_close_matches(key.split(".")[-1], leaves, n=3, cutoff=0.8)
        close = [k for k in keys if k.split(".")[-1] in near][:3]
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return HParamsError(f"unknown hyperparameter {key!r}{hint}")


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in args)
    elif (origin or inner) in (tuple, list):
        name = "comma-separated list of " + (_type_name(args[0]) if args else "str")
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or None" if optional else name


def _number(s: str) -> Any:
    for parse in (int, float):
        try:
            return parse(s)
        except ValueError:
            continue
    return s


def _coerce(value: Any, tp: Any, key: str, parse: bool = True) -> Any:
    """Convert ``value`` (a string to parse, or an already-typed object) to type ``tp``.
    With ``parse=False`` strings are never parsed: this only checks and normalises."""
    inner, optional = _split_optional(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    is_str = parse and isinstance(value, str)
    means_none = is_str and (value == "None" if inner is str else value in _NONE_STRINGS)
    if value is None or (optional and means_none):
        if optional:
            return None
    elif origin is Literal:
        for a in args:
            if value == a or (is_str and value == str(a)):
                return a
    elif inner is bool:
        if isinstance(value, bool) or (is_str and value.strip().lower() in _TRUE | _FALSE):
            return value if isinstance(value, bool) else value.strip().lower() in _TRUE
    elif inner is int or inner is float:
        value = _number(value) if is_str else value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if inner is float:
                return float(value)
            if isinstance(value, int) or value.is_integer():  # "1e6" -> 1000000; inf/nan are not integers
                return int(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif (container := origin or inner) in (tuple, list):
        if is_str:
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if isinstance(value, (list, tuple)):
            fixed = container is tuple and args and args[-1] is not Ellipsis  # e.g. tuple[int, int]
            elem_types = args if fixed else [args[0] if args else str] * len(value)
            try:
                if len(elem_types) == len(value):
                    return container(_coerce(v, t, key, parse) for v, t in zip(value, elem_types))
            except HParamsError:
                pass  # report the whole container's type below
    elif (isinstance(inner, type) and isinstance(value, inner)) or inner is Any or not isinstance(value, str):
        return value  # a matching section, or a type we cannot check: accept typed values as-is
    raise HParamsError(f"hyperparameter {key!r} expects {_type_name(tp)}, got {value!r}")


def _default_section(cls: type[HParams], key: str) -> HParams:
    try:
        return cls()
    except TypeError as e:
        raise HParamsError(f"section {key!r} cannot be turned on with defaults: {e}") from None


def _resolve(root: type[HParams], key: str) -> tuple[Any, type[HParams] | None]:
    """The declared type of dotted ``key`` and, if it is a section, the section's class."""
    parts, cls, tp = key.split("."), root, None
    for i, part in enumerate(parts):
        if cls is None:
            raise HParamsError(f"hyperparameter {'.'.join(parts[:i])!r} ({_type_name(tp)}) "
                               f"is not a section; cannot set {key!r}")
        if part not in (ftypes := _field_types(cls)):
            raise _unknown(key, _all_keys(root))
        tp = ftypes[part]
        cls = _section_type(tp)
    return tp, cls


class HParams:
    """Base class for ``@dataclass`` hyperparameter sections (see the module docstring)."""

    def _validate(self) -> None:
        """Hook for subclasses: raise ``HParamsError(problem, key=field_name)``."""

    def override_from_pair(self, key: str, value: Any) -> None:
        """Set dotted ``key`` to ``value`` (strings are parsed by the field's type; sections take on/off)."""
        parts = key.split(".")
        tp, cls = _resolve(type(self), key)  # check the whole key and value before mutating anything
        if cls is None:
            new = _coerce(value, tp, key)
        elif isinstance(value, cls):
            new = copy.deepcopy(value)
        else:
            word = value if isinstance(value, bool) else "off" if value is None else str(value).strip().lower()
            if word not in _TRUE | _FALSE | {True, False}:
                raise HParamsError(f"section {key!r} expects on or off, got {value!r}")
            if not (new := word is True or word in _TRUE) and not _split_optional(tp)[1]:
                raise HParamsError(f"section {key!r} is required and cannot be turned off")
        obj = self
        for i, part in enumerate(parts[:-1]):  # turn on any off sections along the way
            if getattr(obj, part) is None:
                setattr(obj, part, _default_section(_section_type(_field_types(type(obj))[part]),
                                                    ".".join(parts[: i + 1])))
            obj = getattr(obj, part)
        if cls is not None and isinstance(new, bool):  # a section switch; "on" keeps an on section as is
            current = getattr(obj, parts[-1])
            new = (_default_section(cls, key) if current is None else current) if new else None
        setattr(obj, parts[-1], new)

    def override_from_dict(self, d: Mapping[str, Any], _prefix: str = "") -> None:
        """Apply ``{dotted_key: value}``; values may be typed or strings.  A nested dict for a
        section turns it on and applies its items inside."""
        for k, v in d.items():
            if isinstance(v, Mapping):
                if _resolve(type(self), _prefix + k)[1] is None:
                    raise HParamsError(f"hyperparameter {_prefix + k!r} is not a section; got {v!r}")
                self.override_from_pair(_prefix + k, "on")
                self.override_from_dict(v, f"{_prefix}{k}.")
            else:
                self.override_from_pair(_prefix + k, v)

    def override_from_args(self, args: list[str]) -> None:
        """Apply command-line arguments of the forms ``--a.b=value`` and ``--a.b value``. One
        command line that turns a section off and also sets a key inside it is refused, whatever
        the order (applied in turn, the later one would silently win)."""
        pairs, i = [], 0
        while i < len(args):
            arg = args[i]
            if not arg.startswith("--") or arg in ("--", "--="):
                raise HParamsError(f"unexpected argument {arg!r}; expected --key=value or --key value")
            if "=" in arg:
                key, value = arg[2:].split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, value = arg[2:], args[i + 1]
                i += 1
            else:
                raise HParamsError(f"missing value for {arg!r}; use {arg}=VALUE")
            pairs.append((key, value))
            i += 1
        self._refuse_contradictions(pairs)
        for key, value in pairs:
            self.override_from_pair(key, value)

    def _refuse_contradictions(self, pairs: list[tuple[str, str]]) -> None:
        """HParamsError if `pairs` turn a section off and set a key inside it."""
        for key, value in pairs:
            if str(value).strip().lower() not in _FALSE or _resolve(type(self), key)[1] is None:
                continue
            inside = [k for k, _ in pairs if k.startswith(key + ".")]
            if inside:
                raise HParamsError(f"--{key}={value} turns the section off, but --{inside[0]} sets a key inside "
                                   f"it; pass one or the other")

    def validate(self, _prefix: str = "") -> None:
        """Check every field's type, run ``_validate`` (the section's own ranges), check that every
        float is finite and every int within int64, then do the same in every enabled section."""
        fields = _field_types(type(self))
        for name, tp in fields.items():
            value, key = getattr(self, name), _prefix + name
            checked = _coerce(value, tp, key, parse=False)
            if checked is not value and checked != value:  # e.g. a list in a tuple field
                raise HParamsError(f"hyperparameter {key!r} expects {_type_name(tp)}, got {value!r}")
        try:
            self._validate()
        except HParamsError as e:
            if e.key is None or not _prefix:
                raise
            raise HParamsError(e.message, key=_prefix + e.key) from None
        for name, tp in fields.items():
            if problem := _out_of_range(getattr(self, name), tp):
                raise HParamsError(problem, key=_prefix + name)
        for name in fields:
            if isinstance(sub := getattr(self, name), HParams):
                sub.validate(f"{_prefix}{name}.")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples become lists, off sections None); JSON-serialisable."""
        def plain(v: Any) -> Any:
            if isinstance(v, HParams):
                return v.to_dict()
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {name: plain(getattr(self, name)) for name in _field_types(type(self))}

    def flat_items(self, _prefix: str = "") -> dict[str, Any]:
        """``{dotted_key: value}`` for every leaf; an off section appears as ``{section_key: None}``."""
        out: dict[str, Any] = {}
        for name in _field_types(type(self)):
            value = getattr(self, name)
            if isinstance(value, HParams):
                out.update(value.flat_items(f"{_prefix}{name}."))
            else:
                out[_prefix + name] = value
        return out

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], _prefix: str = ""):
        """Build from a nested dict like to_dict()'s; unknown keys are errors, missing keys take defaults."""
        where = repr(_prefix[:-1] or cls.__name__)
        if not isinstance(d, Mapping):
            raise HParamsError(f"section {where} expects a dict, got {d!r}")
        ftypes, kwargs = _field_types(cls), {}
        for k, v in d.items():
            if k not in ftypes:
                raise _unknown(_prefix + k, _all_keys(cls, _prefix))
            if (sec := _section_type(ftypes[k])) and v is not None:
                kwargs[k] = sec.from_dict(v, f"{_prefix}{k}.")
            else:
                kwargs[k] = _coerce(v, ftypes[k], _prefix + k)
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise HParamsError(f"cannot build {where}: {e}") from None

