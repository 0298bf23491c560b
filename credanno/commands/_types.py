"""Click parameter types that check numbers, lists, seeds and devices as they are parsed.

They raise :class:`~credanno.errors.CredannoError` (not click's ``BadParameter``), so a
bad value is the usual one ``error:`` line naming the option, before any work starts.
"""

from __future__ import annotations

from typing import Any

import click

from credanno import checks
from credanno.runtime import VALID_DEVICES, check_device


def _option(param: click.Parameter | None) -> str:
    if param is None or not param.opts:
        return "value"
    return max(param.opts, key=len)  # the long form: --batch-size, not -b


class FiniteFloat(click.ParamType):
    """A finite float in ``(low, high]`` (``low_open``/``high_open`` choose the ends)."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, *,
                 low_open: bool = True, high_open: bool = False,
                 example: str | None = None) -> None:
        self.low, self.high, self.example = low, high, example
        self.low_open, self.high_open = low_open, high_open

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        return checks.finite(value, _option(param), low=self.low, high=self.high,
                             low_open=self.low_open, high_open=self.high_open,
                             example=self.example)


class Count(click.ParamType):
    """A whole number in ``[low, high]``: epochs, sizes, rows (never 0 unless ``low=0``)."""

    name = "integer"

    def __init__(self, low: int = 1, high: int | None = None) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        return checks.count(value, _option(param), low=self.low, high=self.high)


class Device(click.ParamType):
    """cpu, cuda or cuda:N (checked without importing torch); None = automatic
    (:func:`credanno.runtime.default_device`)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str | None:
        return check_device(value, _option(param))


class FracList(click.ParamType):
    """Label fractions, comma-separated, each in (0, 1]: ``0.01,0.1,1`` (``--frac``)."""

    name = "fracs"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> list[float]:
        from credanno.eval.options import parse_fracs

        if isinstance(value, list):  # already converted (a default given as a list)
            return value
        return parse_fracs(value, _option(param))


class SeedList(click.ParamType):
    """Seeds: a range ``0-4``, a list ``0,3,7`` or one seed ``7`` (``--seeds``)."""

    name = "seeds"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> list[int]:
        from credanno.eval.options import parse_seeds

        if isinstance(value, list):
            return value
        return parse_seeds(value, _option(param))


#: positive count (epochs, batch sizes, sizes)
POSITIVE = Count(1)
#: a random seed
SEED = Count(0, checks.MAX_SEED)
#: ``--n-seeds N``: the first N seeds
N_SEEDS = Count(1, checks.MAX_SEEDS)
DEVICE = Device()
FRACS = FracList()
SEEDS = SeedList()
__all__ = ["DEVICE", "FRACS", "N_SEEDS", "POSITIVE", "SEED", "SEEDS", "Count", "Device",
           "FiniteFloat", "FracList", "RegistryChoice", "RegistryHelpOption", "SeedList",
           "VALID_DEVICES", "registry"]


def registry(names: str) -> list[str]:
    """The names of ``"module:attribute"``: a function returning them (called each time, so
    a module registered later, a plugin, is listed too), a tuple or a dict's keys."""
    import importlib

    module, attr = names.split(":")
    value = getattr(importlib.import_module(module), attr)
    return [str(v) for v in (value() if callable(value) else value)]


class RegistryChoice(click.Choice):
    """A choice among a registry's names, read from the registry when first needed.

    The CLI lists extension points (sources, splits, intensity modes) from their registries
    instead of repeating the names, and stays lazy: ``credanno --help`` imports nothing.
    """

    def __init__(self, names: str) -> None:
        # ``names``: "module:attribute", see :func:`registry`
        self._names = names
        super().__init__([], case_sensitive=True)

    @property
    def choices(self) -> list[str]:  # type: ignore[override]
        return registry(self._names)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it
        pass



class RegistryHelpOption(click.Option):
    """An option whose help text lists a registry's entries, read only when help is shown.

    ``help`` holds ``{names}``, filled with ``registry_help``'s names ("module:attribute",
    see :func:`registry`) joined by ", "; so ``credanno embed`` imports the registry's
    module (and torch) only for ``--help``.
    """

    def __init__(self, *args: Any, registry_help: str, **kwargs: Any) -> None:
        self._registry_help = registry_help
        super().__init__(*args, **kwargs)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        template = self.help
        try:
            self.help = (template or "").replace("{names}", ", ".join(registry(
                self._registry_help)))
            return super().get_help_record(ctx)
        finally:
            self.help = template
