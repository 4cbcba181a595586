"""The CLI as a user meets it: help everywhere, sites, user profiles, submit, fuzzed input."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.cli import COMMANDS
from tests.core.helpers import run_cli, write


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "aegis", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("aegis, version ")


@pytest.mark.parametrize("name", ["plan", "submit", "sites", "modulefile"])
def test_help_on_every_command(capsys, name):
    code, out, _ = run_cli(capsys, name, "--help")
    assert code == 0 and "Usage: aegis" in out


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("plan", "submit", "sites", "modulefile"):
        assert f"  {name} " in out
    assert set(COMMANDS) >= {"plan", "submit", "sites", "modulefile"}


def test_help_lines_are_the_commands_own_docstrings():
    """`aegis --help` lists commands from the COMMANDS table without importing them: each line must be
    the first line of the command's own docstring (hidden commands have none)."""
    import importlib

    for name, (target, summary) in COMMANDS.items():
        module, _, attr = target.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        assert cmd.name == name
        if summary is None:
            assert cmd.hidden, f"{name}: a listed command needs its help line in COMMANDS"
        else:
            assert summary == " ".join(cmd.help.split("\n\n")[0].split()), name


def test_help_imports_no_command_module():
    code = ("import sys; from aegis.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('aegis')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    loaded = eval(out.strip().splitlines()[-1])
    assert set(loaded) <= {"aegis", "aegis._version", "aegis.cli", "aegis.errors", "aegis.remote"}, loaded


def test_sites_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "sites")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ["aurora", "frontier", "h200", "local", "local-sim", "polaris"]
    code, out, _ = run_cli(capsys, "sites", "show", "frontier", "--json")
    data = json.loads(out)
    assert data["visibility_env"] == {"ROCR_VISIBLE_DEVICES": ","} and data["devices_per_node"] == 8
    code, out, _ = run_cli(capsys, "sites", "show", "local")
    data = yaml.safe_load(out)
    assert data["devices_per_node"] == len(os.sched_getaffinity(0))  # 'auto' resolved


def test_user_profile_via_site_file_and_path(tmp_path, capsys, monkeypatch):
    prof = write(tmp_path, """\
        name: mycluster
        inherits: h200
        description: our H200 nodes with 4 GPUs
        devices_per_node: 4
        domains: [{devices: "0-3", cpus: "0-31"}]
        defaults: {queue: gpu4}
        """, "mycluster.yaml")
    code, out, err = run_cli(capsys, "plan", "--site-file", prof, "--model", "m", "--instances", "8", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["site"] == "mycluster" and plan["nodes_required"] == 2
    code, out, _ = run_cli(capsys, "submit", "--dry-run", "--run-dir", "/s/r", "--site-file", prof, "--model", "m")
    assert "#SBATCH --partition=gpu4" in out and "#SBATCH --gpus-per-node=4" in out
    monkeypatch.setenv("AEGIS_SITE_PATH", str(tmp_path))
    code, out, _ = run_cli(capsys, "sites")
    assert "mycluster" in out and str(prof) in out


@pytest.mark.parametrize("text,fragment", [
    ("name: bad\nscheduler: lsf\ndevices_per_node: 4\n", "scheduler:"),
    ("name: bad\nscheduler: slurm\ndevices_per_node: 4\ndevics: 3\n", "devics: unknown key"),
    ("name: bad\nscheduler: slurm\ndevices_per_node: 4\ndomains: [{devices: '0-5', cpus: '0-7'}]\n",
     "go past the 4 devices"),
    ("name: bad\nscheduler: slurm\ndevices_per_node: 4\ndomains: [{devices: '0-2', cpus: '0-7'}]\n",
     "each of the 4 devices exactly once"),
    ("name: bad\nscheduler: slurm\ndevices_per_node: 4\ndefaults: {partition: x}\n",
     "cannot be a site default (did you mean 'queue'?)"),
    ("name: bad\ninherits: nowhere\n", "no site named 'nowhere'"),
    ("name: bad\ninherits: h200\ndefaults: 5\n", "defaults: Input should be a valid dictionary"),
    ("name: bad\nscheduler: slurm\ndevices_per_node: 4\nhostname_patterns: ['(']\n", "not a valid regular expression"),
    ("name: [1, 2\n", "not valid YAML"),
])
def test_bad_site_profile_is_one_clear_line(tmp_path, capsys, text, fragment):
    prof = write(tmp_path, text, "bad.yaml")
    code, out, err = run_cli(capsys, "plan", "--site-file", prof, "--site", "bad", "--model", "m")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and str(prof) in err and fragment in err


def test_missing_site_path_entry(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("AEGIS_SITE_PATH", str(tmp_path / "absent"))
    code, _, err = run_cli(capsys, "sites")
    assert code == 2 and "AEGIS_SITE_PATH entry" in err


def test_submit_writes_run_dir_and_refuses_scheduler_failure(tmp_path, capsys, monkeypatch):
    # A PBS site on a machine without qsub: the run dir is written, the error is one line, exit 1.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "submit", "--site", "aurora", "--model", "m", "--account", "P1",
                             "--run-dir", run_dir)
    assert code == 1
    assert err.strip() == "aegis: error: qsub not found: is this a login node of the right cluster " \
                          "(or is the scheduler's module loaded)?"
    assert (run_dir / "job.sh").exists() and (run_dir / "config.yaml").exists()
    assert not (run_dir / "job_id").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["site"] == "aurora" and saved["models"][0]["model"] == "m"
    code, _, err = run_cli(capsys, "submit", "--site", "aurora", "--model", "m", "--account", "P1", "--run-dir",
                           run_dir)
    assert code == 2 and "already exists and is not empty" in err


def test_submit_reports_scheduler_stderr(tmp_path, capsys, monkeypatch):
    """A scheduler that refuses the job: its stderr reaches the user in one line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    # Recorded from Slurm 22.05 for an unknown partition.
    sbatch.write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\n"
                      "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                      "exit 1\n")
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    code, _, err = run_cli(capsys, "submit", "--site", "h200", "--model", "m", "--queue", "nope",
                           "--run-dir", tmp_path / "r")
    assert code == 1
    assert err.strip() == ("aegis: error: sbatch failed: sbatch: error: invalid partition specified: nope "
                           "sbatch: error: Batch job submission failed: Invalid partition name specified")


@pytest.mark.slow
def test_local_submit_runs_the_script(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "submit", "--site", "local", "--model", "m", "--run-dir", run_dir, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["job_id"].startswith("local-") and (run_dir / "job_id").read_text().strip() == info["job_id"]
    pid = int(info["job_id"].split("-")[1])
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    assert (run_dir / "job.out").exists()


# --------------------------------------------------------------------------- fuzz

KEYS = ["model", "models", "instances", "tensor_parallel_size", "pipeline_parallel_size", "port_start",
        "walltime", "account", "queue", "site", "env", "extra_vllm_args", "pack_models", "nodes",
        "hf_home", "name", "directives", "pass_env", "hf_token_file", "bogus", "tp", "partition"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 100000), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["aurora", "local", "01:00:00", "m", "1:00"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=6)
FLAGS = [[], ["--instances", "3"], ["--tp", "16"], ["--site", "frontier"], ["--nodes", "1"],
         ["--for-model", "x"], ["--walltime", "bad"], ["--", "--max-model-len", "9"], ["--json"]]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(config=st.dictionaries(st.sampled_from(KEYS), values, max_size=6), flags=st.sampled_from(FLAGS),
       command=st.sampled_from(["plan", "submit"]))
def test_fuzzed_configs_never_traceback(tmp_path_factory, capsys, config, flags, command):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    args = [command, str(path)] + (["--dry-run"] if command == "submit" else []) + flags
    if command == "submit" and "--json" in flags:
        args.remove("--json")
    code, out, err = run_cli(capsys, *args)  # an unexpected exception would escape here
    assert code in (0, 2), err
    if code == 2:  # one error line (warnings about the model, e.g. its config.json not found, may come first)
        errors = [line for line in err.strip().splitlines() if not line.startswith("aegis: warning: ")]
        assert len(errors) == 1 and errors[0].startswith("aegis: error: ") or "Usage:" in err
