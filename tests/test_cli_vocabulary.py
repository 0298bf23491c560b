"""One CLI vocabulary, checked over the real click commands (``credanno.cli.COMMANDS``).

``--seeds`` means the same in every command (a range ``0-4``, a list ``0,3,7``, one seed
``7``; ``--n-seeds N`` for the first N), fractions are ``--frac`` everywhere, every
``--device`` has one type and default (None = ``credanno.runtime.default_device()``), and
choices come from the registries.
"""

from __future__ import annotations

import importlib
import inspect

import click
import pytest

from credanno.cli import COMMANDS, main
from credanno.commands._types import Device
from credanno.errors import CredannoError


def _commands() -> list[tuple[list[str], click.Command]]:
    """(path, command) of every subcommand, groups walked (``bench table1``, ...)."""
    out = []
    for name, (module, attr, _) in COMMANDS.items():
        cmd = getattr(importlib.import_module(module), attr)
        if isinstance(cmd, click.Group):
            out += [([name, sub], c) for sub, c in cmd.commands.items()]
        else:
            out.append(([name], cmd))
    return out


def _option(cmd: click.Command, flag: str) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and flag in p.opts), None)


ALL = _commands()
WITH_SEEDS = [(path, cmd) for path, cmd in ALL if _option(cmd, "--seeds") is not None]
IDS = [" ".join(path) for path, _ in ALL]


def _seeds(cmd: click.Command, args: list[str]) -> list[int]:
    ctx = cmd.make_context(cmd.name, list(args))
    return ctx.params["seeds"]


def test_the_commands_with_seeds_are_found():
    names = {" ".join(path) for path, _ in WITH_SEEDS}
    assert {"knn", "probe", "demo", "bench table1", "bench fig2", "bench fig4",
            "bench table2"} <= names


@pytest.mark.parametrize("path,cmd", WITH_SEEDS, ids=[" ".join(p) for p, _ in WITH_SEEDS])
def test_seeds_mean_the_same_everywhere(path, cmd):
    assert _option(cmd, "--n-seeds") is not None
    assert _seeds(cmd, ["--seeds", "0-4"]) == [0, 1, 2, 3, 4]
    assert _seeds(cmd, ["--seeds", "0,3,7"]) == [0, 3, 7]
    assert _seeds(cmd, ["--seeds", "7"]) == [7]  # one seed, not a count
    assert _seeds(cmd, ["--n-seeds", "3"]) == [0, 1, 2]
    for both in (["--seeds", "5", "--n-seeds", "3"], ["--n-seeds", "3", "--seeds", "5"]):
        with pytest.raises(CredannoError, match="give --seeds or --n-seeds, not both"):
            _seeds(cmd, both)  # in either order


@pytest.mark.parametrize("path,cmd", WITH_SEEDS, ids=[" ".join(p) for p, _ in WITH_SEEDS])
def test_seeds_and_n_seeds_together_are_one_line(path, cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--seeds", "0-4", "--n-seeds", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == "error: give --seeds or --n-seeds, not both\n"


@pytest.mark.parametrize("path,default", [
    (["knn"], [0, 1, 2, 3, 4]), (["probe"], [0, 1, 2, 3, 4]), (["demo"], [0, 1, 2]),
    (["bench", "table1"], [0, 1, 2]), (["bench", "fig2"], [0, 1, 2]),
    (["bench", "fig4"], [0, 1, 2]), (["bench", "table2"], [0]),
])
def test_default_seeds_are_unchanged(path, default):
    cmd = dict((" ".join(p), c) for p, c in ALL)[" ".join(path)]
    assert _seeds(cmd, []) == default


@pytest.mark.parametrize("path,cmd", ALL, ids=IDS)
def test_fractions_are_frac_everywhere(path, cmd):
    flags = {o for p in cmd.params for o in p.opts}
    assert not {"--fracs", "--cnn-fracs"} & flags
    for flag in ("--frac", "--cnn-frac"):
        option = _option(cmd, flag)
        if option is not None:  # one parser, comma lists, errors naming the flag used
            ctx = cmd.make_context(cmd.name, [flag, "0.1,1"])
            assert ctx.params[option.name] == [0.1, 1.0]


def test_frac_errors_name_the_flag_used(capsys):
    for flag in ("--frac", "--cnn-frac"):
        with pytest.raises(SystemExit):
            main(["bench", "fig4", flag, "0.1,2"])
        assert f"error: {flag} 2: a label fraction must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("path,cmd", ALL, ids=IDS)
def test_every_device_option_is_the_same(path, cmd):
    option = _option(cmd, "--device")
    if option is None:
        return
    assert isinstance(option.type, Device) and option.default is None
    ctx = cmd.make_context(cmd.name, [])
    assert ctx.params["device"] is None  # resolved by the library: runtime.default_device()
    assert cmd.make_context(cmd.name, ["--device", "CUDA:1"]).params["device"] == "cuda:1"


def test_the_commands_with_device_are_found():
    names = {" ".join(path) for path, cmd in ALL if _option(cmd, "--device") is not None}
    assert {"pretrain", "embed", "knn", "probe", "demo", "bench table1", "bench fig2",
            "bench fig4", "bench table2"} <= names


def test_library_device_defaults_are_automatic():
    from credanno import runtime
    from credanno.bench.fig4 import run_fig4
    from credanno.bench.supervised import EndToEndClassifier
    from credanno.bench.table1 import run_table1
    from credanno.bench.table2 import run_table2
    from credanno.eval.specs import ProbeSpec

    for fn in (run_table1, run_fig4, run_table2):
        assert inspect.signature(fn).parameters["device"].default is None, fn.__name__
    assert EndToEndClassifier().device is None
    assert ProbeSpec(epochs=1).device == runtime.default_device()
    assert runtime.resolve_device(None) == runtime.default_device()


def test_choices_come_from_the_registries():
    from credanno.commands.embed import embed
    from credanno.embed import WHICH
    from credanno.encoders import NORMALISE
    from credanno.pretrain.config import available_presets

    assert list(_option(embed, "--normalise").type.choices) == list(NORMALISE)
    assert list(_option(embed, "--which").type.choices) == list(WHICH)
    for path, cmd in ALL:
        option = _option(cmd, "--preset")
        if option is not None:
            assert list(option.type.choices) == available_presets(), path


def test_encoder_help_lists_the_registry(monkeypatch):
    from credanno import encoders
    from credanno.commands.embed import embed

    monkeypatch.setitem(encoders.ENCODERS, "plugin", encoders.pixel_encoder)
    ctx = click.Context(embed)
    text = _option(embed, "--encoder").get_help_record(ctx)[1]
    for form in encoders.encoder_forms():
        assert form in text
    assert "plugin" in text and "{names}" not in text
    assert "{names}" in _option(embed, "--encoder").help  # the template is kept
