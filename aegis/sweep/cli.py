"""`aegis sweep SPEC --dry-run`: list the configurations, their hashes and what runs; optionally render jobs."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from aegis.errors import UsageError
from aegis.sweep.expand import Point, expand, render_points, run_steps, spec_hash, sweep_document
from aegis.sweep.spec import SweepSpec, load_spec


def _settings_text(point: Point) -> str:
    if not point.settings:
        return "(base)"
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.settings.items())


def format_dry_run(spec: SweepSpec, points: list[Point]) -> str:
    """The human listing: one line per configuration, then the steps every configuration runs."""
    site = points[0].site
    n_axes = sum(1 for p in points if p.origin == "axes")
    lines = [f"sweep {spec.name} ({spec.path}): {len(points)} configurations "
             f"({n_axes} from axes, {len(points) - n_axes} included) on site {site.name} "
             f"({site.scheduler}); spec hash {spec_hash(spec)}"]
    rows = [("#", "HASH", "NAME", "DEVICES", "NODES", "SETTINGS")]
    for i, p in enumerate(points, 1):
        m = p.config.models[0]
        dev = f"{m.instances}x{m.devices_per_instance}={p.devices}"
        rows.append((str(i), p.hash, p.label, dev, str(p.plan.nodes_required), _settings_text(p)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5])
    lines.append("each configuration: start the servers and wait until healthy, then")
    for step in run_steps(spec):
        args = " ".join(shlex.quote(a) for a in step["args"])
        lines.append(f"  {step['step']}: aegis {args} --endpoints RUN_DIR --output-dir RUN_DIR/{step['subdir']}")
    if spec.slo:
        lines.append("SLO: " + ", ".join(f"{k[4:]} {'<=' if k.startswith('max_') else '>='} {v:g}"
                                         for k, v in spec.slo.items()))
    return "\n".join(lines)


@click.command("sweep")
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="List the configurations and what runs; start nothing.")
@click.option("--render", "render_dir", type=click.Path(file_okay=False),
              help="With --dry-run: write each configuration's run directory and job script under DIR.")
@click.option("--site", help="Site profile (default: the spec's, else the base config's, else detected).")
@click.option("--site-file", multiple=True, type=click.Path(dir_okay=False), help="Extra site profile file(s).")
@click.option("--json", "as_json", is_flag=True, help="Print the expanded sweep as JSON.")
def sweep_cmd(spec_path, dry_run, render_dir, site, site_file, as_json):
    """Expand SPEC.yaml (base config x axes + named configurations) into hashed configurations."""
    if not dry_run:
        raise UsageError("running sweeps is not available yet; use --dry-run (add --render DIR for job scripts)")
    spec = load_spec(spec_path)
    points = expand(spec, site, site_file)
    if render_dir:
        written = render_points(spec, points, Path(render_dir))
    if as_json:
        click.echo(json.dumps(sweep_document(spec, points), indent=2))
    else:
        click.echo(format_dry_run(spec, points))
        if render_dir:
            click.echo(f"wrote {len(written)} job scripts under {Path(render_dir).absolute()}")
