"""The report as a library: collect runs, judge them against an SLO, write the files.

`aegis report` and a finished sweep both call `make_report`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aegis.bench.slo import SLOError, from_mapping
from aegis.errors import UsageError
from aegis.report.analyze import Verdict, rank
from aegis.report.collect import collect

DEFAULT_TITLE = "aegis report"


@dataclass
class Report:
    """What a report found and wrote."""

    verdicts: list[Verdict]  # ranked: passing runs first, by output throughput
    slo: dict[str, float]
    files: list[Path]  # CSV, Markdown, HTML
    plots: list[Path]  # PNG

    @property
    def passing(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.passed]

    @property
    def best(self) -> Verdict | None:
        return next(iter(self.passing), None)

    def lines(self) -> list[str]:
        """The short account `aegis report` prints: runs, how many meet the SLO, the best, the files."""
        return [f"{len(self.verdicts)} runs, {len(self.passing)} meet the SLO; best: "
                f"{self.best.run.name if self.best else 'none'}"] + [f"  {f}" for f in self.files + self.plots]


def sweep_slo(paths: Iterable[str | Path]) -> dict[str, float]:
    """The SLO of the first sweep.json found at or above the given directories ({} when there is none)."""
    from aegis.sweep.expand import SWEEP_FILE

    for given in paths:
        for d in [Path(given).absolute(), *Path(given).absolute().parents]:
            f = d / SWEEP_FILE
            if f.is_file():
                try:
                    data = json.loads(f.read_text())
                except ValueError:
                    return {}
                try:  # a record written earlier: read as the grammar allows, whatever it limits
                    return from_mapping((data.get("slo") if isinstance(data, dict) else None) or {})
                except SLOError as exc:
                    raise UsageError(f"{f}: slo.{exc.key}: {exc.msg}") from None
    return {}


def make_report(paths: Iterable[str | Path], output_dir: str | Path, slo: Mapping[str, float] | None = None,
                devices: int | None = None, title: str = DEFAULT_TITLE, plots: bool = True) -> Report:
    """Aggregate `paths` (bench, probe or sweep directories, searched recursively) into a ranked report.

    `slo`: limits as aegis.bench.slo parses them ({"max_p95_ttft_ms": 2000, ...}); None: the sweep's
    (sweep.json at or above the directories), if any. `devices`: devices behind each run when no
    sweep point says. `plots` needs matplotlib. Writes into `output_dir` (created).
    """
    paths = list(paths)
    slo_map = dict(slo) if slo is not None else sweep_slo(paths)
    verdicts = rank(collect(paths, devices), slo_map)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if plots:
        from aegis.report.plots import all_plots

        pngs = all_plots(verdicts, out)
    from aegis.report.render import write_all

    files = write_all(verdicts, slo_map, pngs, out, title)
    return Report(verdicts=verdicts, slo=slo_map, files=files, plots=pngs)
