"""Click parameter types that check numbers and devices as they are parsed.

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
    """cpu, cuda or cuda:N (checked without importing torch)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str | None:
        return check_device(value, _option(param))


#: positive count (epochs, batch sizes, sizes)
POSITIVE = Count(1)
#: a random seed
SEED = Count(0, checks.MAX_SEED)
DEVICE = Device()
__all__ = ["DEVICE", "POSITIVE", "SEED", "Count", "Device", "FiniteFloat", "VALID_DEVICES"]


class RegistryChoice(click.Choice):
    """A choice among a registry's names, read from the registry when first needed.

    The CLI lists extension points (sources, splits, intensity modes) from their registries
    instead of repeating the names, and stays lazy: ``credanno --help`` imports nothing.
    """

    def __init__(self, names: str) -> None:
        # ``names``: "module:function" returning the registered names
        self._names = names
        super().__init__([], case_sensitive=True)

    @property
    def choices(self) -> list[str]:  # type: ignore[override]
        # Read each time: a module registered later (a plugin) is listed too.
        import importlib

        module, func = self._names.split(":")
        return list(getattr(importlib.import_module(module), func)())

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it
        pass

