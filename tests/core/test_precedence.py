"""CLI flag > config file > site profile default > built-in default."""
import json

from aegis.plan.placement import Plan
from tests.core.helpers import run_cli, write


def dry_run(capsys, *args):
    code, out, err = run_cli(capsys, "submit", "--dry-run", "--run-dir", "/scratch/run1", *args)
    assert code == 0, err
    return out


def plan_json(capsys, *args) -> Plan:
    code, out, err = run_cli(capsys, "plan", "--json", *args)
    assert code == 0, err
    return Plan.from_dict(json.loads(out))


def test_builtin_then_site_then_config_then_cli(tmp_path, capsys):
    # built-in: walltime 01:00:00; site aurora: queue debug, filesystems flare:home
    out = dry_run(capsys, "--site", "aurora", "--model", "m")
    assert "#PBS -l walltime=01:00:00" in out and "#PBS -q debug" in out
    assert "#PBS -l filesystems=flare:home" in out
    cfg = write(tmp_path, "model: m\nsite: aurora\nqueue: prod\nwalltime: \"02:30:00\"\n")
    out = dry_run(capsys, cfg)
    assert "#PBS -q prod" in out and "#PBS -l walltime=02:30:00" in out
    assert "#PBS -l filesystems=flare:home" in out  # still the site default
    out = dry_run(capsys, cfg, "--queue", "capacity", "--walltime", "1-00:00:00")
    assert "#PBS -q capacity" in out and "#PBS -l walltime=24:00:00" in out


def test_cli_model_flags_override_single_model_config(tmp_path, capsys):
    cfg = write(tmp_path, "model: m\ninstances: 2\ntensor_parallel_size: 6\nsite: aurora\nport_start: 9000\n")
    plan = plan_json(capsys, cfg, "--instances", "5", "--tp", "12", "--port-start", "9100")
    assert len(plan.instances) == 5
    assert plan.instances[0].tensor_parallel_size == 12
    assert plan.instances[0].port == 9100
    assert plan.nodes_required == 5


def test_per_model_flag_with_several_models_needs_for_model(tmp_path, capsys):
    cfg = write(tmp_path, """\
        site: h200
        models:
          - {model: org/big, name: big, tensor_parallel_size: 8}
          - {model: org/small, name: small, instances: 4}
        """)
    code, _, err = run_cli(capsys, "plan", cfg, "--instances", "3")
    assert code == 2
    assert "--instances applies to one model but" in err and "has 2 (big, small): add --for-model NAME" in err
    plan = plan_json(capsys, cfg, "--instances", "3", "--for-model", "big")
    assert [i.name for i in plan.instances] == ["big-0", "big-1", "big-2", "small-0", "small-1",
                                                "small-2", "small-3"]
    code, _, err = run_cli(capsys, "plan", cfg, "--instances", "3", "--for-model", "huge")
    assert code == 2 and "--for-model huge: no such model" in err


def test_extra_engine_args_after_double_dash_and_as_string(tmp_path, capsys):
    cfg = write(tmp_path, "model: m\nextra_vllm_args: [\"--max-model-len\", 32768]\n")
    code, out, err = run_cli(capsys, "submit", "--dry-run", "--run-dir", tmp_path / "r", cfg,
                             "--extra-vllm-args", "--enable-prefix-caching", "--", "--max-num-seqs", "64")
    assert code == 0, err
    from aegis.config.flags import resolve_from_cli
    res = resolve_from_cli({"args": (str(cfg), "--max-num-seqs", "64"),
                            "extra_vllm_args": "--enable-prefix-caching"})
    assert res.config.models[0].extra_vllm_args == [
        "--max-model-len", "32768", "--enable-prefix-caching", "--max-num-seqs", "64"]
    # Without a config file, `--` args still go to the engine, not to CONFIG.
    res = resolve_from_cli({"args": ("--max-model-len", "512"), "model": "m"})
    assert res.source is None and res.config.models[0].extra_vllm_args == ["--max-model-len", "512"]


def test_unquoted_walltime_stays_a_walltime(tmp_path, capsys):
    # YAML 1.1 reads 1:00:00 as the base-60 integer 3600; aegis keeps it a string.
    cfg = write(tmp_path, "model: m\nsite: h200\nwalltime: 1:30:00\n")
    out = dry_run(capsys, cfg)
    assert "#SBATCH --time=01:30:00" in out


def test_site_detected_from_hostname(monkeypatch, capsys):
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "x4102c5s2b0n0")
    monkeypatch.setattr(socket, "getfqdn", lambda: "x4102c5s2b0n0.hostmgmt.cm.aurora.alcf.anl.gov")
    assert plan_json(capsys, "--model", "m").site == "aurora"
    monkeypatch.setattr(socket, "gethostname", lambda: "workstation")
    monkeypatch.setattr(socket, "getfqdn", lambda: "workstation.lan")
    assert plan_json(capsys, "--model", "m").site == "local"


def test_cli_engine_args_go_where_the_model_keeps_them(tmp_path):
    from aegis.config.flags import resolve_from_cli
    cfg = write(tmp_path, "site: h200\nmodel: org/m\nengine: sglang\n"
                          "extra_args: [\"--mem-fraction-static\", \"0.8\"]\n")
    res = resolve_from_cli({"args": (str(cfg), "--chunked-prefill-size", "4096"), "extra_vllm_args": "--a b"})
    spec = res.config.models[0]
    assert spec.extra_args == ["--mem-fraction-static", "0.8", "--a", "b", "--chunked-prefill-size", "4096"]
    assert spec.extra_vllm_args == []


def test_engine_that_cannot_drive_the_site_is_refused_at_plan_time(tmp_path, capsys):
    cfg = write(tmp_path, "site: aurora\nmodel: m\nengine: trtllm\napi_key: false\n")
    code, out, err = run_cli(capsys, "plan", cfg)
    assert code == 2 and out == ""
    assert "engine 'trtllm' does not run on devices selected with ZE_AFFINITY_MASK" in err
