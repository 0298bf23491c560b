"""The ``credanno`` command line: a thin click group over the library.

Subcommands live in :mod:`credanno.commands` and are imported only when invoked, so that
``credanno --help`` and ``credanno prepare`` do not pay for importing torch. Every
:class:`~credanno.errors.CredannoError` becomes one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import importlib
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
    "tsne": ("credanno.commands.tsne", "tsne", "t-SNE picture of a store's features."),
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
def cli() -> None:
    """cRedAnno: explainable lung-nodule diagnosis from self-supervised features."""


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, CredannoWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the group, turning user errors into one line."""
    warnings.showwarning = _show_warning
    try:
        rc = cli.main(args=argv, prog_name="credanno", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except CredannoError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted; nothing partial was left behind", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing partial was left behind", err=True)
        sys.exit(130)
    except FileNotFoundError as exc:
        click.echo(f"error: file not found: {exc.filename}", err=True)
        sys.exit(2)
