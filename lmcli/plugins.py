"""Entry-point plugins: every subcommand of `lm` (and of `lm serve`) comes from an entry-point group.

A plugin is either a function, mounted as a command, or a `typer.Typer`, mounted as a command group.
A plugin that fails to load is reported in one line on stderr; the rest of the CLI keeps working.
"""

import sys
from importlib.metadata import entry_points

import typer


def mount(app: typer.Typer, group: str) -> None:
    taken: dict[str, str] = {}
    for ep in sorted(entry_points(group=group), key=lambda ep: ep.name):
        if ep.name in taken:
            _report(f"plugin {ep.name!r} ({ep.value}) in {group} skipped: the name is taken by {taken[ep.name]}")
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the whole CLI down
            _report(f"plugin {ep.name!r} ({ep.value}) in {group} failed to load: {type(e).__name__}: {e}")
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        elif callable(obj):
            app.command(name=ep.name)(obj)
        else:
            _report(f"plugin {ep.name!r} ({ep.value}) in {group} is neither a function nor a typer.Typer")
            continue
        taken[ep.name] = ep.value


def _report(line: str) -> None:
    print("lm: " + " ".join(line.split()), file=sys.stderr)
