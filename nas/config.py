"""The config toolkit both packages import: the error every bad field raises, YAML a user wrote read safely,
mappings checked against a dataclass's fields, and the one number validator. It imports nothing from the
project, so `search_spaces` and every layer of `nas` can stand on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

MAX_PROBLEM = 1000  # characters of a ConfigError's message: whatever a message embeds, it stays readable
MAX_SEED = 2**32 - 1  # numpy's seed range: torch takes up to 2**64 - 1, and seeds are offset per run and step
MAX_NUMBER = 2**63 - 1  # any count a config holds: int64, as checkpoints, storages and torch keep them


class ConfigError(ValueError):
    """A config field is missing, of the wrong type or out of range; the message names the field."""

    def __init__(self, field_name: str, problem: str):
        if len(problem) > MAX_PROBLEM:  # the head says what is wrong, the tail where: keep both
            problem = f"{problem[: MAX_PROBLEM // 2]} ... {problem[-MAX_PROBLEM // 2 :]}"
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}...{text[-17:]}"


def is_number(value: Any) -> bool:
    """An int or a finite float (not a bool, not inf or nan)."""
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and math.isfinite(value))


def check_number(name: str, value: Any, *, minimum: float = 0, maximum: float | None = MAX_NUMBER,
                 integer: bool = False, positive: bool = False, optional: bool = False) -> None:
    """The one number validator: `value` is a number (an int with `integer`), >= `minimum` (and > 0 with
    `positive`), <= `maximum` (None: unbounded); None passes when `optional`. Else a ConfigError naming `name`."""
    if value is None and optional:
        return
    if not is_number(value) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(name, f"must be {kind}{' or null' if optional else ''}, got {shown(value)}")
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum:g}, got {shown(value)}")
    if positive and value <= 0:
        raise ConfigError(name, f"must be > 0, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum:,}, got {shown(value)}")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, *, optional: bool = False) -> None:
    """`check_number` of an integer in [minimum, maximum]."""
    check_number(name, value, minimum=minimum, maximum=maximum, integer=True, optional=optional)


MAX_YAML_VALUES = 100_000  # a config holds hundreds; nested aliases (*) can make billions of a few hundred bytes


class _UserYAMLLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document holding more than MAX_YAML_VALUES values once its aliases are expanded,
    before anything walks (or prints) the expansion, and an alias inside its own anchor."""

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise yaml.MarkedYAMLError(problem=f"holds more than {MAX_YAML_VALUES:,} values once its aliases (*) "
                                       "are expanded", problem_mark=node.start_mark)
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in `node`'s tree, aliases expanded; `sizes` memoises shared nodes, so this is one pass."""
    key = id(node)
    if key not in sizes:
        if key in open_nodes:
            raise yaml.MarkedYAMLError(problem="an alias (*) inside its own anchor (&)", problem_mark=node.start_mark)
        open_nodes.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[key] = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
        open_nodes.discard(key)
    return sizes[key]


def safe_yaml_load(text: str | bytes, where: str = "config") -> Any:
    """YAML a user wrote (bytes are decoded as UTF-8), its aliases expanded to at most MAX_YAML_VALUES values;
    any problem is one single-line ConfigError whose field is `where`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(where, f"not UTF-8 text (byte {error.start} is {text[error.start]:#04x})") from None
    try:
        return yaml.load(text, Loader=_UserYAMLLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        what = ", ".join(filter(None, (error.context, error.problem)))
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(where, f"not valid YAML: {what}{at}") from None
    except yaml.YAMLError as error:
        raise ConfigError(where, f"not valid YAML: {' '.join(str(error).split())}") from None
    except RecursionError:
        raise ConfigError(where, "not valid YAML: nested too deeply") from None
    except ValueError as error:  # a scalar YAML resolves but Python refuses: an integer of 5,000 digits, 2024-13-45
        raise ConfigError(where, f"not valid YAML: {error}") from None


def read_yaml(path: str | Path, where: str = "config") -> Any:
    """`safe_yaml_load` of a file; errors name the file."""
    path = Path(path)
    try:
        return safe_yaml_load(path.read_bytes(), where)
    except OSError as error:
        raise ConfigError(where, f"cannot read {path} ({error.strerror})") from None
    except ConfigError as error:
        raise ConfigError(where, f"{path}: {error.problem}") from None


def is_file(path: str | Path) -> bool:
    """`Path.is_file`, but False for a name the system refuses (too long, ...): it names no file either."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def check_fields(cls: type, data: Any, where: str) -> dict:
    """`data` if it is a mapping of `cls`'s dataclass fields; else a ConfigError naming the section `where`
    ("" for the top level) or its first unknown field, with the known ones."""
    if not isinstance(data, dict):
        raise ConfigError(where or "config", f"must be a mapping of {cls.__name__} fields, got {shown(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        name = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 80 else shown(unknown[0])
        field = f"{where}.{name}" if where else name
        raise ConfigError(field, f"unknown field (known: {', '.join(sorted(known))})")
    return data


def from_mapping(cls: type, data: Any, where: str):
    """`cls(**data)` for a config dataclass, after `check_fields`."""
    return cls(**check_fields(cls, data, where))


def first_line(error: BaseException, *, typed: bool = False) -> str:
    """The first line of `error`'s message for a one-line report (`typed`: after its type's name); its type's
    name alone when the message is empty."""
    line = (str(error).strip().splitlines() or [""])[0].strip()
    if not line:
        return type(error).__name__
    return f"{type(error).__name__}: {line}" if typed else line


def write_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` whole or not at all: a reader, or another process writing it at the same moment,
    sees the old file or a new one, never half of one. The temporary file has a name of its own and goes if
    the write fails (a full disk keeps no half-written file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def json_digest(data: Any, length: int = 12) -> str:
    """A short hash of JSON-able `data`, the same for equal data (keys sorted): the name of a file or folder that
    holds what the data describe (a checkpoint's run, a latency model's key)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


__all__ = ["MAX_NUMBER", "MAX_PROBLEM", "MAX_SEED", "MAX_YAML_VALUES", "ConfigError", "check_fields", "check_int",
           "check_number", "first_line", "from_mapping", "is_file", "is_number", "json_digest", "read_yaml",
           "safe_yaml_load", "shown", "write_atomically"]
