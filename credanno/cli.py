"""The ``credanno`` command line: a thin click group over the library.

Subcommands live in :mod:`credanno.commands` and are imported only when invoked, so that
``credanno --help`` and ``credanno prepare`` do not pay for importing torch. Every
:class:`~credanno.errors.CredannoError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from credanno import __version__
from credanno.errors import CredannoError, CredannoWarning

#: subcommand -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "prepare": ("credanno.commands.prepare", "prepare",
                "Select LIDC nodules and write a labelled patch file."),
    "pretrain": ("credanno.commands.pretrain", "pretrain",
                 "Self-supervised DINO pretraining of a ViT encoder."),
    "embed": ("credanno.commands.embed", "embed",
              "Run a frozen encoder over a patch file into a feature store."),
    "knn": ("credanno.commands.knn", "knn", "k-NN classification from a feature store."),
    "probe": ("credanno.commands.probe", "probe",
              "Train the paper's linear predictors (G_exp, G_cls) on stored features."),
    "select": ("credanno.commands.select", "select",
               "Choose which training images to label next (label-free, ranked)."),
    "active": ("credanno.commands.active", "active",
               "cRedAnno+ loop: seed set, pseudo-labels, labels requested over rounds."),
    "tsne": ("credanno.commands.tsne", "tsne", "t-SNE picture of a store's features."),
    "explore": ("credanno.commands.explore", "explore",
                "One offline HTML page to explore a store's learned space, nodule by nodule."),
    "bench": ("credanno.commands.bench", "bench", "Reproduce the paper's tables and figures."),
    "demo": ("credanno.commands.demo", "demo", "The whole pipeline on the embedded default."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="credanno")
@click.option("--traceback", is_flag=True,
              help="Show the full traceback of an error (also: CREDANNO_TRACEBACK=1).")
def cli(traceback: bool) -> None:
    """cRedAnno: explainable lung-nodule diagnosis from self-supervised features."""


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, CredannoWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


#: Set to 1 to see the full traceback of an error (for developers and bug reports).
TRACEBACK_ENV = "CREDANNO_TRACEBACK"


def _os_error_line(exc: OSError) -> str:
    """One line for an OS error no library code turned into a CredannoError."""
    from pathlib import Path

    from credanno._atomic import os_error

    if exc.filename is None:
        reason = exc.strerror or str(exc).splitlines()[0]
        return f"{reason}; rerun with {TRACEBACK_ENV}=1 for details"
    return str(os_error(exc, Path(exc.filename)))


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the group, turning user errors into one line.

    ``credanno --traceback CMD`` (or ``CREDANNO_TRACEBACK=1``) lets errors propagate with
    their traceback instead.
    """
    warnings.showwarning = _show_warning
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")
    if args[:1] == ["--traceback"]:
        args, debug = args[1:], True
    try:
        rc = cli.main(args=args, prog_name="credanno", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except click.exceptions.Abort:
        _fail("interrupted; nothing partial was left behind", 130)
    except click.UsageError as exc:
        # click prints usage + blank line + "Error: ..."; we keep to one line
        where = exc.ctx.command_path if exc.ctx is not None else "credanno"
        _fail(f"{exc.format_message()} (see '{where} --help')", 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code or 2)
    except KeyboardInterrupt:
        _fail("interrupted; nothing partial was left behind", 130)
    except CredannoError as exc:
        if debug:
            raise
        _fail(str(exc), exc.exit_code)
    except FileNotFoundError as exc:
        if debug:
            raise
        _fail(f"file not found: {exc.filename}", 2)
    except OSError as exc:
        if debug:
            raise
        _fail(_os_error_line(exc), 2)
    except MemoryError:
        if debug:
            raise
        _fail("out of memory; use a smaller --batch-size or fewer rows", 2)
