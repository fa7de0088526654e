"""The one `nccid` command: a shell over the library. Each command module parses its options, calls one library
function and renders the result; none holds a rule.

Errors: the library raises `nccid.errors.NccidError` subclasses whose message is one line naming the file, key,
row, field or tag. `NccidGroup.invoke` is the single place that turns them (and operating-system errors such as a
full disk) into ``error: <message>`` on standard error and an exit code; no command catches them itself.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from nccid.console import err_console
from nccid.errors import NccidError


def _os_message(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}:{where}" if where else f"{exc.strerror or exc}"


class NccidGroup(TyperGroup):
    """The top-level command group: the one handler for library and operating-system errors."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NccidError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)  # a message is text, not markup
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            err_console.print(f"[red]error:[/] {escape(_os_message(exc))}", highlight=False)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=NccidGroup,
    help="nccid: a national chest imaging research database (hospital side, warehouse, researcher access).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"nccid {version('nccid')}")
        raise typer.Exit()


@app.callback()
def _setup(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Structured JSON logs on standard error when NCCID_LOG is set (info, debug)."""
    from nccid.log import configure

    configure()


def _register() -> None:
    from nccid.cli import access, demo, s3, site, site_node, vault, warehouse

    app.command("synth")(warehouse.synth)
    app.add_typer(warehouse.app, name="warehouse")
    app.command("ls")(access.ls)
    app.command("cat")(access.cat_)
    app.command("sync")(access.sync_)
    app.command("stats")(warehouse.stats_)
    app.add_typer(s3.app, name="s3")
    app.add_typer(access.app, name="access")
    app.add_typer(vault.app, name="vault")
    site.app.command("node")(site_node.site_node)
    app.add_typer(site.app, name="site")
    app.command("demo")(demo.demo)
    for optional in ("portal", "validate"):  # shells built in their own modules
        try:
            module = __import__(f"nccid.cli.{optional}", fromlist=["app"])
        except ModuleNotFoundError as exc:
            if exc.name != f"nccid.cli.{optional}":
                raise
            continue
        app.add_typer(module.app, name=optional)


_register()


def _metavars(command: click.Command) -> None:
    """Plain placeholders in help: arguments as their upper-case names (OUTBOX, not {outbox}) and repeatable
    options as the type of one value (PATH, not <list[Path]>)."""
    for param in command.params:
        if param.metavar is not None:
            continue
        if getattr(param, "param_type_name", "") == "argument":
            param.metavar = name = param.name.upper()
            # click's usage line: OUTBOX when required, [OUTBOX] when not (typer would write {outbox})
            param._usage_display_name = lambda name=name, required=param.required: name if required else f"[{name}]"
        elif getattr(param, "multiple", False):
            one = param.bare_type().removeprefix("list[").removesuffix("]") if hasattr(param, "bare_type") else ""
            param.metavar = {"Path": "PATH", "str": "TEXT", "int": "N"}.get(one, "VALUE")
    for sub in getattr(command, "commands", {}).values():
        _metavars(sub)


def command() -> click.Command:
    """The whole `nccid` command tree as click sees it (for help, tests and documentation)."""
    built = typer.main.get_command(app)
    _metavars(built)
    return built


def main() -> None:
    """The `nccid` entry point."""
    command()(prog_name="nccid")


if __name__ == "__main__":  # python -m nccid.cli
    sys.exit(main())
