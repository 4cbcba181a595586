"""Every config error is one clear line naming the file and key, with exit code 2."""
import json
import os

import pytest

from tests.core.helpers import run_cli, write

BASE = """\
model: meta-llama/Llama-3.3-70B-Instruct
instances: 2
tensor_parallel_size: 6
site: aurora
"""

CASES = [
    # (config text appended to BASE or replacing it, expected fragments)
    ("tensor_paralel_size: 6\n", ["tensor_paralel_size: unknown key", "did you mean 'tensor_parallel_size'"]),
    ("partition: debug\n", ["partition: unknown key", "did you mean 'queue'"]),
    ("tp: 2\n", ["tp: unknown key", "did you mean 'tensor_parallel_size'"]),
    ("walltime: 1h\n", ["walltime:", "'1h' is not a walltime", "HH:MM:SS"]),
    ("walltime: 60\n", ["walltime:", "valid string", "got 60"]),
    ("walltime: \"00:00:00\"\n", ["walltime: must be longer than zero"]),
    ("port_start: 70000\n", ["port_start:", "less than or equal to 65535"]),
    ("port_start: 80\n", ["port_start:", "greater than or equal to 1024"]),
    ("account: \"My Project\"\n", ["account:", "cannot go into a job-script directive"]),
    ("env: {HF_TOKEN: abc}\n", ["HF_TOKEN looks like a secret", "pass_env"]),
    ("hf_token: hf_abc\n", ["hf_token:", "secrets must not be written"]),
    ("env: {\"1BAD\": x}\n", ["'1BAD' is not a valid environment variable name"]),
    ("extra_vllm_args: --max-model-len 4096\n", ["extra_vllm_args: must be a list"]),
    ("pack_models: maybe\n", ["pack_models:", "valid boolean"]),
    ("directives: [\"--qos=high; rm -rf ~\"]\n", ["directives:", "is not a scheduler option"]),
]


@pytest.mark.parametrize("extra,fragments", CASES, ids=[c[0].split(":")[0] for c in CASES])
def test_config_error_messages(tmp_path, capsys, extra, fragments):
    path = write(tmp_path, BASE.replace("instances: 2\n", "instances: 2\n" + extra)
                 if not extra.startswith(("walltime", "port_start")) else BASE + extra)
    code, out, err = run_cli(capsys, "plan", path)
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"aegis: error: {path}: ")
    for frag in fragments:
        assert frag in lines[0]


@pytest.mark.parametrize("text,fragments", [
    ("instances: 0\nmodel: m\n", ["instances:", "greater than 0", "got 0"]),
    ("instances: -3\nmodel: m\n", ["instances:", "greater than 0"]),
    ("instances: two\nmodel: m\n", ["instances:", "valid integer", "'two'"]),
    ("instances: true\nmodel: m\n", ["instances:", "valid integer"]),
    ("instances: 2.5\nmodel: m\n", ["instances:", "valid integer"]),
    ("instances: 2\n", ["model: is required"]),
    ("model: m\nmodel: n\n", ["duplicate key 'model'", "line 2"]),
    ("model: [unclosed\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["must be a YAML mapping"]),
    ("models:\n  - model: a\n    instances: 2\n  - model: b\n    port_start: 8001\n",
     ["port ranges overlap", "'a' uses 8000-8001", "'b' uses 8001-8001"]),
    ("models:\n  - model: a\n  - model: b\n    tensor_parallel_size: 0\n",
     ["models[1].tensor_parallel_size:", "greater than 0"]),
    ("models:\n  - model: a\n  - modle: b\n", ["models[1].modle: unknown key", "did you mean 'model'"]),
    ("instances: 3\nmodels:\n  - model: a\n", ["instances: is a per-model key", "inside each model"]),
    ("models:\n  - model: org/a\n  - model: other/a\n", ["two models are both named 'a'", "distinct 'name'"]),
    ("models: a-string\n", ["models: must be a list"]),
    ("model: m\nname: \"Bad Name\"\n", ["name:", "is not a valid job name"]),
    ("model: \"m\\nrm -rf ~\"\n", ["model:", "control characters"]),
    # ports are per host: 40 instances on h200 (8 per node) need 8 ports, 65530-65537
    ("model: m\nport_start: 65530\ninstances: 40\n", ["ports 65530-65537 go past 65535", "8 instance(s) per node"]),
])
def test_more_config_errors(tmp_path, capsys, text, fragments):
    path = write(tmp_path, text)
    code, out, err = run_cli(capsys, "plan", path, "--site", "h200")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for frag in fragments:
        assert frag in err


@pytest.mark.parametrize("name,secret", [
    ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("OPENAI_API_KEY", True), ("WANDB_APIKEY", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("DB_PASSWORD", True), ("hf_token", True),
    ("TOKENIZERS_PARALLELISM", False), ("VLLM_LOGGING_LEVEL", False), ("KEYCLOAK_URL", False),
    ("SECRETARY", False),
])
def test_secret_names(tmp_path, capsys, name, secret):
    path = write(tmp_path, f"model: m\nenv: {{{name}: x}}\n")
    code, _, err = run_cli(capsys, "plan", path)
    assert (code == 2 and "looks like a secret" in err) if secret else code == 0, err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", tmp_path / "nope.yaml")
    assert code == 2
    assert err.strip() == f"aegis: error: {tmp_path / 'nope.yaml'}: config file not found"


def test_instance_larger_than_a_node_uses_part_of_each_node(tmp_path, capsys):
    """ALCF's vLLM recipe serves Llama-3.1-405B with TP 8 x PP 2 on 2 Aurora nodes, 8 of 12 tiles each
    (argonne-lcf/user-guides docs/aurora/data-science/inference/vllm.md, "Serving Large Models on
    Multiple Tiles and Nodes"); aegis once refused any TP x PP that was not a multiple of 12."""
    path = write(tmp_path, "model: m\ntensor_parallel_size: 8\npipeline_parallel_size: 2\nsite: aurora\n")
    code, out, err = run_cli(capsys, "plan", path, "--json")
    assert code == 0, err
    (inst,) = json.loads(out)["instances"]
    assert [(p["node"], p["devices"]) for p in inst["placement"]] == [(0, [str(d) for d in range(8)]),
                                                                      (1, [str(d) for d in range(8)])]


def test_unknown_site_suggests(capsys):
    code, _, err = run_cli(capsys, "plan", "--model", "m", "--site", "auroraa")
    assert code == 2
    assert "no site named 'auroraa' (did you mean 'aurora'?)" in err
    assert "known sites: aurora, frontier, h200, local, local-sim, polaris" in err


def test_hf_token_file_must_be_private(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("hf_secret\n")
    os.chmod(token, 0o644)
    path = write(tmp_path, f"model: m\nhf_token_file: {token}\n")
    code, _, err = run_cli(capsys, "plan", path)
    assert code == 2
    assert f"is readable by others (mode 0644); run: chmod 600 {token}" in err
    os.chmod(token, 0o600)
    code, _, err = run_cli(capsys, "plan", path)
    assert code == 0, err
    missing = write(tmp_path, f"model: m\nhf_token_file: {tmp_path}/absent\n", "c2.yaml")
    code, _, err = run_cli(capsys, "plan", missing)
    assert code == 2 and "does not exist" in err


def test_flag_errors_name_the_flag(capsys):
    code, _, err = run_cli(capsys, "plan", "--model", "m", "--instances", "0")
    assert code == 2
    assert err.strip().startswith("aegis: error: --instances:")
    code, _, err = run_cli(capsys, "plan", "--model", "m", "--walltime", "forever")
    assert code == 2 and "--walltime: 'forever' is not a walltime" in err


def test_click_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "plan", "--nodes", "0", "--model", "m")
    assert code == 2 and "--nodes" in err
    code, _, err = run_cli(capsys, "plan", "--no-such-flag")
    assert code == 2 and "No such option" in err


def test_debug_shows_traceback(tmp_path, capsys):
    path = write(tmp_path, "model: m\ninstances: 0\n")
    with pytest.raises(Exception) as info:
        from aegis.cli import main
        main(["--debug", "plan", str(path)])
    assert "instances" in str(info.value)
