"""`pip install .` into a fresh venv gives a working `aegis`, and the Lmod modulefile loads it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv") / "aegis-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # A copy of the tree, so the build leaves nothing in the checkout.
    src = tmp_path_factory.mktemp("src") / "aegis"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", ".hypothesis", "runs"))
    # mpicc and cmake are installed by tests/run.sh: the build must ship the compiled stage tool.
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "AEGIS_BUILD_STAGE": "1"}
    proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(src)  # the install must not depend on the source tree
    return venv


@pytest.mark.slow
def test_installed_aegis_plans_and_renders(installed, tmp_path):
    aegis = installed / "bin" / "aegis"
    cfg = REPO / "examples" / "aurora-llama70b.yaml"
    out = subprocess.run([str(aegis), "plan", str(cfg)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "site aurora (pbs)" in out.stdout
    out = subprocess.run([str(aegis), "submit", str(cfg), "--dry-run", "--run-dir", str(tmp_path / "r")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#PBS -l select=" in out.stdout
    # Every command module came along (a package missing from setup.py would drop its commands).
    from aegis.cli import COMMANDS
    helptext = subprocess.run([str(aegis), "--help"], capture_output=True, text=True, cwd=tmp_path).stdout
    hidden = ("agent", "sweep-point")  # started by aegis itself, not listed
    missing = [n for n in COMMANDS if n not in hidden and f"  {n} " not in helptext]
    missing += [n for n in hidden if subprocess.run([str(aegis), n, "--help"], capture_output=True,
                                                     cwd=tmp_path).returncode != 0]
    assert not missing, f"commands missing from the installed aegis: {missing}"
    # the templates and site profiles came along as package data (read with importlib.resources)
    py = installed / "bin" / "python"
    loc = subprocess.run([str(py), "-c", "import importlib.resources as r; print(r.files('aegis.templates'))"],
                         capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert loc.startswith(str(installed)) and (Path(loc) / "slurm.sh.j2").exists()
    sites = subprocess.run([str(py), "-m", "aegis", "sites"], capture_output=True, text=True, cwd=tmp_path)
    assert sites.returncode == 0 and "frontier" in sites.stdout
    # `pip install .` built csrc/ with CMake and shipped the binary inside the package.
    found = subprocess.run([str(py), "-c", "from aegis.staging import find_binary; print(find_binary())"],
                           capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "AEGIS_STAGE_BIN": ""})
    binary = found.stdout.strip()
    assert binary.startswith(str(installed)) and binary.endswith("aegis/_bin/aegis-stage"), found.stderr


@pytest.mark.slow
def test_lmod_modulefile_loads_aegis(installed, tmp_path):
    assert LMOD_INIT.exists(), "tests/run.sh installs the Debian package lmod"
    bin_dir = tmp_path / "aegis-0.1.0" / "bin"  # only `aegis`, so the venv's python stays off PATH
    bin_dir.mkdir(parents=True)
    (bin_dir / "aegis").symlink_to(installed / "bin" / "aegis")
    mod_dir = tmp_path / "modulefiles" / "aegis"
    mod_dir.mkdir(parents=True)
    text = subprocess.run([str(installed / "bin" / "aegis"), "modulefile", "--bin-dir", str(bin_dir),
                           "--site-path", "/soft/aegis/sites"], capture_output=True, text=True, check=True).stdout
    (mod_dir / "0.1.0.lua").write_text(text)
    script = (f"source {LMOD_INIT}\nmodule use {tmp_path / 'modulefiles'}\nmodule load aegis/0.1.0\n"
              "command -v aegis\naegis --version\necho \"SITE_PATH=$AEGIS_SITE_PATH\"\n"
              "module unload aegis\ncommand -v aegis || echo gone\n")
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(bin_dir / "aegis")
    assert lines[1].startswith("aegis, version ")
    assert "SITE_PATH=/soft/aegis/sites" in lines
    assert lines[-1] == "gone"
