"""The instance spec: what the pod asks for, loaded strictly from JSON.

Unknown fields and wrong types are refused with the field's name: a typo in a spec must not
silently fall back to a default.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

Accel = Literal["auto", "kvm", "tcg"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field."""


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


def _name(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(
            f"name {value!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


@attrs.frozen(kw_only=True)
class InstanceSpec:
    name: str = attrs.field(validator=_name)
    vcpus: int = attrs.field(validator=_positive)
    memory_mib: int = attrs.field(validator=_positive)
    accel: Accel = "auto"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    extra_args: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.kernel is None and (self.initrd is not None or self.cmdline is not None):
            raise ValueError("initrd and cmdline need a kernel")


def _strict(kind: type) -> Any:
    """Structure hook that takes values of exactly `kind` (no "2" → 2, no true → 1)."""

    def hook(value: object, _type: object) -> object:
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return hook


def _converter() -> cattrs.Converter:
    c = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind in (int, str, bool, float):
        c.register_structure_hook(kind, _strict(kind))

    def strings(value: object, _type: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(type(v) is str for v in value):
            raise TypeError("expected a list of strings")
        return tuple(value)

    c.register_structure_hook_func(lambda t: t == tuple[str, ...], strings)
    return c


converter = _converter()


def _format(exc: BaseException, type_: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if "not in literal" in str(exc):  # cattrs raises a bare Exception for Literal
        allowed = ", ".join(str(a) for a in getattr(type_, "__args__", ()))
        return f"must be one of {allowed}, not {exc.args[0].split(' not in ')[0]!r}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown field(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, (TypeError, ValueError)) and str(exc):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)  # type: ignore[arg-type]


def describe(exc: BaseException) -> str:
    """One line naming each failing field, from a cattrs/attrs error."""
    if isinstance(exc, ClassValidationError):
        lines = cattrs.transform_error(exc, path="$", format_exception=_format)
        return "; ".join(_tidy(line) for line in lines)
    return _format(exc, None)


def _tidy(line: str) -> str:
    # cattrs says "expected int @ $.vcpus"; a person reads "field vcpus: expected int".
    message, _, where = line.rpartition(" @ ")
    field = where.removeprefix("$").removeprefix(".")
    return f"field {field}: {message}" if field else message


def load(text: str, source: str = "spec") -> InstanceSpec:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise SpecError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{source} must be a JSON object")
    try:
        return converter.structure(raw, InstanceSpec)
    except (ClassValidationError, ForbiddenExtraKeysError, ValueError, TypeError) as e:
        raise SpecError(f"{source}: {describe(e)}") from None


def to_json(spec: InstanceSpec) -> str:
    return json.dumps(converter.unstructure(spec), indent=2)
