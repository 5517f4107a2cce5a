"""click building blocks of the `sglbatch` command line: a group listing its subcommands in
the order they were added, commands whose --help shows their options in titled sections, and
options taking one or more values (`--batch-size 1 8 32`)."""

from __future__ import annotations

from typing import Any

import click


class Group(click.Group):
    """Lists its subcommands in the order they were added, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class MultiValueOption(click.Option):
    """An option taking one or more values, up to the next option: `--batch-size 1 8 32`
    (`Command` spreads them as `--batch-size 1 --batch-size 8 ...`), so repeating it adds
    values too."""

    def __init__(self, param_decls: list[str], **attrs: Any):
        super().__init__(param_decls, multiple=True, **attrs)


class Command(click.Command):
    """A command whose options are grouped in sections ("Options" first, then e.g. "Engine
    options"), each a titled list in --help."""

    def __init__(self, name: str, sections: dict[str, list[click.Parameter]], **attrs: Any):
        self.sections = {"Options": [], **sections}
        super().__init__(name, params=[p for ps in self.sections.values() for p in ps], **attrs)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        help_option = self.get_help_option(ctx)
        for title, params in self.sections.items():
            if title == "Options" and help_option is not None:
                params = [*params, help_option]
            rows = [p.get_help_record(ctx) for p in params if isinstance(p, click.Option)]
            if rows := [row for row in rows if row is not None]:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        multi = {opt for p in self.params if isinstance(p, MultiValueOption) for opt in p.opts}
        return super().parse_args(ctx, _spread(args, multi) if multi else args)


def _spread(args: list[str], flags: set[str]) -> list[str]:
    """`--flag a b` as `--flag a --flag b` for each of `flags`: the values run up to the next
    option (a negative number is a value) or `--`."""
    out: list[str] = []
    flag, taken = None, 0
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        if arg.startswith("-") and not _is_number(arg):
            flag, taken = (arg if arg in flags else None), 0
        elif flag is not None:
            if taken:
                out.append(flag)
            taken += 1
        out.append(arg)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
