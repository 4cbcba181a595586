"""Rendered job scripts: golden files for every shipped site, bash -n, shellcheck, quoting."""
import difflib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from aegis.config.flags import resolve_from_cli
from aegis.errors import ConfigError
from aegis.run import render_job
from tests.core.helpers import write

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = Path("/scratch/proj/runs/20260101-000000-test")
UPDATE = os.environ.get("AEGIS_UPDATE_GOLDEN") == "1"

CONFIGS = {
    "aurora": """\
        model: meta-llama/Llama-3.3-70B-Instruct
        instances: 2
        tensor_parallel_size: 4
        port_start: 8000
        hf_home: /tmp/hf_home
        model_source: /flare/datasets/model-weights/hub/models--meta-llama--Llama-3.3-70B-Instruct
        walltime: "01:00:00"
        account: MyProject
        queue: debug
        filesystems: flare:home
        site: aurora
        pass_env: [HF_TOKEN]
        extra_vllm_args: ["--max-model-len", "32768"]
        env: {VLLM_LOGGING_LEVEL: INFO}
        """,
    "polaris": """\
        site: polaris
        account: MyProject
        walltime: "00:30:00"
        models:
          - {model: meta-llama/Llama-3.1-70B-Instruct, name: llama-70b, instances: 2, tensor_parallel_size: 4}
          - {model: meta-llama/Llama-3.1-8B-Instruct, name: llama-8b, instances: 4}
        """,
    "frontier": """\
        site: frontier
        account: ABC123
        walltime: "02:00:00"
        env: {MIOPEN_USER_DB_PATH: /tmp/miopen}
        models:
          - {model: meta-llama/Llama-3.3-70B-Instruct, name: llama-70b, instances: 4, tensor_parallel_size: 8}
          - {model: meta-llama/Llama-3.1-8B-Instruct, name: llama-8b, instances: 8, port_start: 8100}
        """,
    "h200": """\
        site: h200
        queue: gpu
        account: research
        walltime: "1-12:00:00"
        directives: ["--qos=high", "--constraint=h200"]
        model: zai-org/GLM-4.6
        tensor_parallel_size: 8
        pipeline_parallel_size: 2
        """,
    "local": """\
        site: local
        model: /tmp/tiny-model
        name: tiny
        """,
}
HOSTILE = """\
    model: "x; rm -rf ~"
    site: {site}
    hf_home: "/tmp/$(touch {marker})/hf"
    env: {{AEGIS_TEST_VALUE: "a'b\\"c`touch {marker}`$(touch {marker}) ; rm -rf ~"}}
    """


def render(tmp_path, site, text, command="aegis"):
    cfg = write(tmp_path, text, f"{site}.yaml")
    res = resolve_from_cli({"args": (str(cfg),)})
    return render_job(res, RUN_DIR, aegis_command=command)


def check_golden(name, text):
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"golden file {path} is missing; run AEGIS_UPDATE_GOLDEN=1 pytest {__file__}")
        path.write_text(text)
        return
    expected = path.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            str(path), "rendered"))
        pytest.fail(f"rendered script differs from {path}. If the change is intended, review the diff "
                    f"and run AEGIS_UPDATE_GOLDEN=1 pytest {__file__}\n{diff}")


def lint(tmp_path, name, text):
    script = tmp_path / name
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    sc = subprocess.run(["shellcheck", "-s", "bash", "-S", "style", str(script)],
                        capture_output=True, text=True)
    assert sc.returncode == 0, sc.stdout + sc.stderr


@pytest.mark.parametrize("site", sorted(CONFIGS))
def test_golden_script(tmp_path, site):
    text = render(tmp_path, site, CONFIGS[site])
    check_golden(f"{site}.sh", text)
    lint(tmp_path, f"{site}.sh", text)


@pytest.mark.parametrize("site", sorted(CONFIGS))
def test_hostile_values_render_harmlessly(tmp_path, site):
    marker = tmp_path / "PWNED"
    text = render(tmp_path, site, HOSTILE.format(site=site, marker=marker))
    lint(tmp_path, f"hostile-{site}.sh", text)
    assert "rm -rf" not in text.replace("'", "").split("AEGIS_TEST_VALUE=")[0]
    check_golden(f"hostile-{site}.sh", text.replace(str(marker), "MARKER"))


def test_hostile_script_really_runs_harmlessly(tmp_path):
    """Execute a rendered local script with a stub `aegis` that records what it received."""
    marker = tmp_path / "PWNED"
    stub = tmp_path / "stub-aegis"
    record = tmp_path / "record"
    stub.write_text(f"#!/bin/bash\n{{ printf '%s\\n' \"$@\"; printf 'HF_HOME=%s\\n' \"$HF_HOME\"; "
                    f"printf 'VALUE=%s\\n' \"$AEGIS_TEST_VALUE\"; pwd; }} > {record}\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    cfg = write(tmp_path, HOSTILE.format(site="local", marker=marker), "hostile.yaml")
    res = resolve_from_cli({"args": (str(cfg),)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "job.sh"
    script.write_text(render_job(res, run_dir, aegis_command=str(stub)))
    subprocess.run(["bash", str(script)], check=True, cwd=tmp_path)
    assert not marker.exists()
    lines = record.read_text().splitlines()
    assert lines[:6] == ["launch", "--run-dir", str(run_dir), "--site-file", str(run_dir / "site.yaml"),
                         str(run_dir / "config.yaml")]
    assert f"HF_HOME=/tmp/$(touch {marker})/hf" in lines
    assert f"VALUE=a'b\"c`touch {marker}`$(touch {marker}) ; rm -rf ~" in lines
    assert lines[-1] == str(run_dir)


def test_run_dir_with_spaces_is_refused(tmp_path):
    cfg = write(tmp_path, CONFIGS["h200"], "h.yaml")
    res = resolve_from_cli({"args": (str(cfg),)})
    with pytest.raises(ConfigError, match="cannot go into a job-script directive"):
        render_job(res, Path("/scratch/my runs/x"))


def test_no_secret_reaches_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret")
    text = render(tmp_path, "aurora", CONFIGS["aurora"])
    assert "hf_supersecret" not in text
    assert "#PBS -v HF_TOKEN\n" in text  # the name only: qsub copies the value


def test_golden_files_have_no_leftovers():
    expected = {f"{s}.sh" for s in CONFIGS} | {f"hostile-{s}.sh" for s in CONFIGS}
    assert {p.name for p in GOLDEN.glob("*.sh")} == expected


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="never: tests/run.sh installs shellcheck")
def test_shellcheck_is_real(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\necho $1\n")
    assert subprocess.run(["shellcheck", str(bad)], capture_output=True).returncode != 0
