"""The endpoints file reader, --url handling and API key resolution."""
import json
import os

import pytest

from aegis.bench.endpoints import fleet_from_urls, load_endpoints, normalize_url
from aegis.errors import UsageError
from aegis.util.apikey import resolve_api_key


def write(tmp_path, instances, **extra):
    p = tmp_path / "endpoints.json"
    p.write_text(json.dumps({"job_id": "1", "run_dir": str(tmp_path), "instances": instances, **extra}))
    os.chmod(p, 0o600)
    return p


def inst(name, model="llama", status="ready", port=8000, **kw):
    return {"name": name, "model": model, "url": f"http://127.0.0.1:{port}", "host": "127.0.0.1",
            "port": port, "status": status, "devices": [0], **kw}


def test_run_dir_or_file_only_ready_instances(tmp_path):
    write(tmp_path, [inst("llama-0"), inst("llama-1", status="starting", port=8001),
                     inst("llama-2", status="failed", port=8002)])
    for arg in (tmp_path, tmp_path / "endpoints.json"):
        fleet = load_endpoints(arg)
        assert [e.name for e in fleet.for_model(None)] == ["llama-0"]


def test_several_models_need_model(tmp_path):
    write(tmp_path, [inst("a-0", model="a"), inst("b-0", model="b", port=8001)])
    fleet = load_endpoints(tmp_path)
    with pytest.raises(UsageError, match="--model"):
        fleet.for_model(None)
    assert [e.name for e in fleet.for_model("b")] == ["b-0"]
    with pytest.raises(UsageError, match="no ready endpoint serves model 'c'"):
        fleet.for_model("c")


def test_no_ready_endpoint_lists_states(tmp_path):
    write(tmp_path, [inst("a-0", status="starting")])
    with pytest.raises(UsageError, match="a-0=starting"):
        load_endpoints(tmp_path).for_model(None)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_endpoints(tmp_path / "nope.json")
    (tmp_path / "endpoints.json").write_text("{")
    with pytest.raises(UsageError, match="cannot read"):
        load_endpoints(tmp_path)


def test_url_normalisation():
    assert normalize_url("localhost:8000") == "http://localhost:8000"
    assert normalize_url("http://h:1/v1/") == "http://h:1"
    with pytest.raises(UsageError):
        normalize_url("ftp://h")
    assert [e.url for e in fleet_from_urls(["h:1", "h:2"]).endpoints] == ["http://h:1", "http://h:2"]


def test_api_key_order_and_private_file(tmp_path, monkeypatch):
    monkeypatch.delenv("AEGIS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    key = tmp_path / "key"
    key.write_text("from-fleet\n")
    os.chmod(key, 0o600)
    fleet = load_endpoints(write(tmp_path, [inst("a")], api_key_file="key"))
    assert resolve_api_key(None, fleet.api_key_file) == "from-fleet"
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")  # the user's OpenAI key does not win over the run's
    assert resolve_api_key(None, fleet.api_key_file) == "from-fleet"
    assert resolve_api_key(None, None) == "from-openai-env"  # servers without a run key file
    monkeypatch.setenv("AEGIS_API_KEY", "from-env")
    assert resolve_api_key(None, fleet.api_key_file) == "from-env"
    own = tmp_path / "own"
    own.write_text("from-flag")
    os.chmod(own, 0o600)
    assert resolve_api_key(str(own), fleet.api_key_file) == "from-flag"
    os.chmod(own, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        resolve_api_key(str(own), fleet.api_key_file)
