"""The ``specplan`` command. Each subcommand lives in ``specplan/commands/<name>.py`` and exposes ``command``.

Subcommand modules are imported only when listed or run; each parses its options, calls a room (planner,
simulator, engine, validation) inside its function and prints, so ``specplan search`` never pays for torch.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

import specplan.commands
from specplan import __version__
from specplan.errors import SpecplanError


class UserError(click.ClickException):
    """A ``SpecplanError`` shown as one line ("Error: ...") with its exit code."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class CommandsGroup(click.Group):
    """Finds subcommands in ``specplan.commands`` and turns ``SpecplanError`` into a one-line error."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [m.name for m in pkgutil.iter_modules(specplan.commands.__path__) if not m.name.startswith("_")]
        return sorted(n.replace("_", "-") for n in names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.list_commands(ctx):
            return None
        module = importlib.import_module(f"specplan.commands.{cmd_name.replace('-', '_')}")
        return module.command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpecplanError as e:
            raise UserError(" ".join(str(e).split("\n")), e.exit_code) from None
        except KeyboardInterrupt:
            raise UserError("interrupted; results already written are complete", 130) from None


@click.group(cls=CommandsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="specplan")
def main() -> None:
    """Plan, simulate and run huge language models on small machines, and check the predictions."""


if __name__ == "__main__":
    main()
