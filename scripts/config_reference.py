"""Write docs/configuration.md from the configuration models, so it cannot drift.

    .venv/bin/python scripts/config_reference.py          # rewrite the file
    .venv/bin/python scripts/config_reference.py --check  # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orchestrator.config import ReleaseConfig

OUT = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

INTRO = """# Configuration reference

Generated from `orchestrator/config.py` by `scripts/config_reference.py`; do not edit
by hand. The file is YAML; unknown keys are errors. Durations accept `250ms`, `30s`,
`5m`, `1h` or a number of seconds. Secrets (`password`, tokens, header values) are
`{env: NAME}` or `{file: /path}`, never literal values. Relative paths are resolved
against the configuration file's folder. A complete example: `examples/release.yaml`.
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        # " or ", not "|": a pipe would split the markdown table's cell.
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def walk(tp: Any) -> None:
        if inspect.isclass(tp) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for f in tp.model_fields.values():
                walk(f.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    walk(root)
    return seen


def render() -> str:
    out = [INTRO]
    for model in _models(ReleaseConfig):
        out.append(f"\n## {model.__name__}\n")
        doc = inspect.getdoc(model)
        if doc and model.__doc__:
            out.append(doc + "\n")
        out.append("| key | type | default |\n|---|---|---|")
        for name, f in model.model_fields.items():
            key = f.alias or name
            if f.default is not PydanticUndefined:
                default = "" if f.default is None else f"`{f.default!r}`"
            elif f.default_factory is not None:
                default = "(see the section)"
            else:
                default = "**required**"
            out.append(f"| `{key}` | {_type_name(f.annotation)} | {default} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
