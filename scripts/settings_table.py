"""Print the README's configuration table from `sandqueue.settings.Settings`.

`tests/unit/test_readme.py` fails when the README's table differs from this output, so the
table cannot drift from the code: after changing a setting, run
`python scripts/settings_table.py --write`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic import AliasChoices

from sandqueue.settings import Settings

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"


def env_names(name: str) -> str:
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(c) for c in alias.choices]
        return " or ".join(f"`{n}`" for n in reversed(names))
    return f"`SANDQUEUE_{name.upper()}`"


def table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| {env_names(name)} | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    block = f"{BEGIN}\n{table()}\n{END}"
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / "README.md"
    if "--write" in sys.argv:
        path.write_text(render(path.read_text()))
    else:
        print(table())
