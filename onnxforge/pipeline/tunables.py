"""What a search may tune in a pass: the options a pass declares tunable on a given model, and their ranges."""

from __future__ import annotations

from dataclasses import dataclass

Value = bool | int | float | str


@dataclass(frozen=True)
class Choice:
    """One of `values` (a single value: the option is set, not searched)."""

    values: tuple[Value, ...]


@dataclass(frozen=True)
class Interval:
    """A number from `low` to `high` in steps of `step` (a whole number when `integer`)."""

    low: float
    high: float
    step: float
    integer: bool = False

    def values(self) -> list[float | int]:
        """Every value of the interval, low to high."""
        count = int(round((self.high - self.low) / self.step)) + 1
        values = [round(self.low + i * self.step, 10) for i in range(count)]
        return [int(v) for v in values] if self.integer else values


@dataclass(frozen=True)
class Subset:
    """Any subset of `items` (layer op types or node names), as the list option that names the ones left out
    (`exclude`): each item is searched as in or out on its own."""

    items: tuple[str, ...]


Tunable = Choice | Interval | Subset


@dataclass(frozen=True)
class SearchTarget:
    """Where a searched model will run, and what the search has, for a pass to say what is worth tuning:
    the backend and target, and whether --data samples are given (calibration, recovery)."""

    backend: str = "ort"
    target: str = "cpu"
    has_data: bool = False
