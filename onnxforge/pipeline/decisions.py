"""Measured decisions of a run (which format a layer type keeps, whether a pass stands): recorded, or replayed.

Timing a model on a busy machine gives a slightly different figure each run, so a choice made by timing can
flip between runs. Every such choice goes through `Decisions.decide` under a key that names the pass's
position and description and what is decided; the run's report keeps the values, and a later run given that
report replays them without timing anything, so it produces the same model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxforge.errors import DecisionsError


@dataclass
class Measured:
    """What a measuring function returns: the decision as a value (names, formats, booleans; JSON), and the
    timings behind it, which the report shows but a replay never uses."""

    value: Any
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """A decision a pass got: its value, the timings when it was measured now, and where it was replayed from
    (empty when measured)."""

    key: str
    value: Any
    timings: dict[str, Any] = field(default_factory=dict)
    replayed_from: str = ""

    @property
    def replayed(self) -> bool:
        return bool(self.replayed_from)


class Decisions:
    """The measured decisions of one run: measured and recorded, or, given a record, replayed from it."""

    def __init__(self, recorded: Mapping[str, Any] | None = None, source: str = "", seed: int | None = None):
        """`recorded` maps keys to values (None: measure); `source` names the record in messages; `seed` is
        the verification seed of the run that wrote it."""
        self._recorded = None if recorded is None else dict(recorded)
        self.source = source
        self.seed = seed
        self.made: dict[str, Decision] = {}

    @property
    def replaying(self) -> bool:
        return self._recorded is not None

    def decide(self, key: str, measure: Callable[[], Measured], allowed: Collection[Any] | None = None) -> Decision:
        """The decision for `key`: replayed from the record without calling `measure`, or measured now and
        recorded. A replay whose record lacks `key`, or holds a value outside `allowed` (when given), raises
        DecisionsError."""
        if self._recorded is None:
            measured = measure()
            # Through JSON now, so a measured value and the same value replayed from a report are alike.
            value = json.loads(json.dumps(measured.value))
            decision = Decision(key, value, dict(measured.timings))
        elif key not in self._recorded:
            raise DecisionsError(
                f"{self.source} has no decision '{key}': it was written by another pipeline or onnxforge "
                "version; run without it to measure again"
            )
        elif allowed is not None and self._recorded[key] not in allowed:
            raise DecisionsError(
                f"{self.source} decides {self._recorded[key]!r} for '{key}', which this run does not offer: "
                "it was written by another onnxforge version; run without it to measure again"
            )
        else:
            decision = Decision(key, self._recorded[key], replayed_from=self.source)
        self.made[key] = decision
        return decision

    def to_dict(self) -> dict[str, Any]:
        """The report's "decisions" section: each key's value, with the timings behind it when measured."""
        return {
            "replayed_from": self.source or None,
            "values": {key: decision.value for key, decision in self.made.items()},
            "timings": {key: decision.timings for key, decision in self.made.items() if decision.timings},
        }

    @classmethod
    def replay(cls, record: str | os.PathLike | Mapping[str, Any]) -> Decisions:
        """Decisions to replay from a report JSON written by `--report` (a path), or from such a report or its
        "decisions" section as a dict; DecisionsError if it holds none."""
        if isinstance(record, (str, os.PathLike)):
            source = f"--decisions {record}"
            try:
                report = json.loads(Path(record).read_text())
            except FileNotFoundError:
                raise DecisionsError(f"--decisions {record}: no such file") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DecisionsError(f"--decisions {record} is not a JSON report ({exc})") from None
        else:
            source, report = "decisions=", record
        section = report.get("decisions", report) if isinstance(report, Mapping) else None
        values = section.get("values") if isinstance(section, Mapping) else None
        if not isinstance(values, Mapping):
            raise DecisionsError(
                f"{source} holds no decisions: give a report written by optimize --report (its \"decisions\" section)"
            )
        verification = report.get("verification") if isinstance(report, Mapping) else None
        seed = verification.get("seed") if isinstance(verification, Mapping) else None
        return cls(values, source, seed if isinstance(seed, int) else None)
