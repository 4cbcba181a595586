"""`aegis sites` (list and show site profiles) and `aegis modulefile` (install aegis as an Lmod module)."""
from __future__ import annotations

import json
import os
import sys
import sysconfig

import click
import yaml

from aegis._version import __version__
from aegis.config.sites import all_sites, load_site
from aegis.util.tables import format_table


@click.group("sites", invoke_without_command=True)
@click.option("--site-file", multiple=True, type=click.Path(dir_okay=False), help="Extra site profile file(s).")
@click.pass_context
def sites_cmd(ctx, site_file):
    """List the site profiles (shipped, AEGIS_SITE_PATH, --site-file)."""
    ctx.ensure_object(dict)
    ctx.obj["site_files"] = site_file
    if ctx.invoked_subcommand is None:
        click.echo(format_table(["NAME", "SCHEDULER", "DEVICES/NODE", "SOURCE", "DESCRIPTION"],
                                [(s.name, s.scheduler, s.devices_per_node, s.source, s.description)
                                 for s in all_sites(site_file)]))


@sites_cmd.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def sites_show(ctx, name, as_json):
    """Print one site profile, resolved (inheritance applied, 'auto' filled in)."""
    site = load_site(name, ctx.obj.get("site_files", ())).resolved()
    data = site.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)


# --------------------------------------------------------------------------- modulefile


def _lua(value: str) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@click.command("modulefile")
@click.option("--bin-dir", type=click.Path(file_okay=False),
              help="Directory holding the `aegis` command to put on PATH (default: this one's).")
@click.option("--site-path", help="AEGIS_SITE_PATH to set (site profile directory of the centre).")
@click.option("--depends", multiple=True, help="Modules to load first (repeatable).")
def modulefile_cmd(bin_dir, site_path, depends):
    """Print an Lmod (Lua) modulefile that puts this aegis on PATH."""
    from aegis.templates import environment

    if bin_dir is None:
        bin_dir = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv[0].endswith("aegis") \
            else sysconfig.get_path("scripts")
    click.echo(environment(lua=_lua).get_template("modulefile.lua.j2").render(
        version=__version__, bin_dir=os.path.abspath(bin_dir), site_path=site_path, depends=depends), nl=False)
