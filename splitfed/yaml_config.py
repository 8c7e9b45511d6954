"""A YAML settings file with command-line overrides laid over it, validated by a pydantic model.

One loader for the edge agent's and the aggregator's configs. A bad field is reported with its
dotted path and, when it came from the file, its line. Passwords never live in the YAML:
`broker.password_file` names a file (`splitfed.mqtt.MqttSettings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from splitfed.errors import UserError

M = TypeVar("M", bound=BaseModel)


def set_dotted(d: dict[str, Any], path: str, value: Any) -> None:
    """`d["a"]["b"] = value` for the path "a.b", making (or replacing) mappings on the way."""
    keys = path.split(".")
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            d[k] = nxt
        d = nxt
    d[keys[-1]] = value


def yaml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its nearest parent that exists)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if hit is None:
                break
            line = hit[0].start_mark.line + 1
            node = hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def load_yaml_config(
    model: type[M],
    path: Path | None,
    overrides: dict[str, Any] | None = None,
) -> M:
    """`model` from the YAML at `path` (optional) with the dotted-path `overrides` that are not
    None laid over it, or a UserError naming the file, line and field."""
    text = ""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of settings")
        data = loaded
        broker = data.get("broker")
        if isinstance(broker, dict) and "password" in broker:
            line = yaml_line(text, ("broker", "password"))
            raise UserError(
                f"{path} line {line}: broker.password: passwords do not belong in the YAML; "
                "put it in a file and set broker.password_file"
            )
    from_file = set(data)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        field_name = ".".join(map(str, loc)) or "config"
        where = ""
        if path is not None and loc and loc[0] in from_file:
            line = yaml_line(text, loc)
            where = f"{path} line {line}: " if line else f"{path}: "
        elif path is not None:
            where = f"{path}: "
        raise UserError(f"{where}{field_name}: {err['msg']}") from None
