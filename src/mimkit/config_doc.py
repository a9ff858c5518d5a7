"""``mimkit config show`` / ``config keys``: the merged config with each key's comment.

The comments are the ``# ...`` after each field in ``mimkit/config.py`` (one source of truth for
code readers and ``config show``), read with ``ast`` (which field is on which lines) and
``tokenize`` (the comment tokens).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from functools import cache
from typing import Any

import yaml

from mimkit import config as config_module
from mimkit.config import Config


@cache
def field_comments() -> dict[str, dict[str, str]]:
    """``{dataclass name: {field: comment}}`` for the config dataclasses (fields without a
    comment are absent)."""
    source = inspect.getsource(config_module)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = out.setdefault(node.name, {})
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                lines = range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                text = " ".join(comments[n] for n in lines if n in comments)
                if text:
                    fields[stmt.target.id] = text
    return out


def _scalar(value: Any) -> str:
    """``value`` as one line of YAML (flow style for lists)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def iter_keys(cfg: Any, default: Any | None = None, prefix: str = ""):
    """``(dotted key, value, default, type, comment)`` for every leaf of ``cfg``."""
    default = type(cfg)() if default is None else default
    hints = typing.get_type_hints(type(cfg))
    notes = field_comments().get(type(cfg).__name__, {})
    for f in dataclasses.fields(cfg):
        value, dflt = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_keys(value, dflt, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, dflt, hints[f.name], notes.get(f.name, "")


def show(cfg: Config) -> str:
    """The config as YAML, each key followed by its comment; a key whose value differs from the
    dataclass default also shows the default (``[default: X]``). Loads back as ``to_dict(cfg)``."""
    lines: list[str] = []
    opened: list[str] = []
    for key, value, dflt, _, note in iter_keys(cfg):
        *sections, name = key.split(".")
        common = 0
        while common < min(len(opened), len(sections)) and opened[common] == sections[common]:
            common += 1
        opened = opened[:common]
        for depth in range(common, len(sections)):  # open the new sub-sections
            lines.append(f"{'  ' * depth}{sections[depth]}:")
            opened.append(sections[depth])
        parts = [] if value == dflt else [f"[default: {_scalar(dflt)}]"]
        parts += [note] if note else []
        comment = f"  # {' '.join(parts)}" if parts else ""
        lines.append(f"{'  ' * len(sections)}{name}: {_scalar(value)}{comment}")
    return "\n".join(lines) + "\n"


def _type_name(tp: Any) -> str:
    """``int``, ``float | None``, ``list``; a choice as its values (``auto|bf16|fp16|off``)."""
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def keys_table(cfg: Config | None = None) -> str:
    """One line per key: ``key  type  default  comment``."""
    rows = [(k, _type_name(tp), _scalar(d), note) for k, _, d, tp, note in iter_keys(cfg or Config())]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {n}".rstrip()
                     for k, t, d, n in rows) + "\n"
