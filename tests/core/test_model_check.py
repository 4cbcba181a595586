"""TP and PP held to the model's own config.json (aegis/plan/model_check.py, aegis/plan/model_config.py).

vLLM refuses a tensor_parallel_size that does not divide the model's attention heads
(ModelConfig.verify_with_parallel_config in vllm/config/model.py: "Total number of attention heads (64)
must be divisible by tensor parallel size (6)"), and splits the hidden layers over the pipeline stages
(get_pp_indices in vllm/distributed/utils.py). ALCF's vLLM guide for Aurora
(argonne-lcf/user-guides, docs/aurora/data-science/inference/vllm.md): Llama-3.1-70B has 64 heads,
"so valid TP values are 1, 2, 4, 8", and all 12 tiles of a node usually do not divide the heads.
The recorded configs under fixtures/model_configs/ (values from each model's config.json on
huggingface.co, see its README) stand in for the Hugging Face cache.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from aegis.plan import model_check
from aegis.plan.model_check import valid_tp_sizes
from aegis.plan.model_config import find_config, read_shape
from tests.core.helpers import run_cli, write

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "model_configs"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
SWEEPS = sorted((REPO / "examples" / "sweeps").glob("*.yaml"))
LLAMA70 = "meta-llama/Llama-3.3-70B-Instruct"


@pytest.fixture(autouse=True)
def hf_cache(monkeypatch, tmp_path):
    """HF_HOME at the recorded configs; no other cache of this machine is looked in."""
    monkeypatch.setenv("HF_HOME", str(FIXTURES))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(model_check, "_WARNED", set())  # each test sees its own warnings


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aegis: warning:")]


# --------------------------------------------------------------------------- refused layouts


@pytest.mark.parametrize("command", [["plan"], ["submit", "--dry-run"], ["submit"]])
def test_tp_that_does_not_divide_the_heads_is_refused(capsys, tmp_path, command):
    cfg = write(tmp_path, f"""\
        site: aurora
        model: {LLAMA70}
        instances: 2
        tensor_parallel_size: 6
        runs_dir: {tmp_path / 'runs'}
        """)
    code, out, err = run_cli(capsys, *command, cfg, "--run-dir", tmp_path / "run") if command[0] == "submit" \
        else run_cli(capsys, *command, cfg)
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    line = lines[0]
    assert line.startswith("aegis: error: model 'llama-3.3-70b-instruct': tensor_parallel_size 6 does not divide "
                           "the 64 attention heads of meta-llama/Llama-3.3-70B-Instruct"), line
    assert str(FIXTURES / "hub" / "models--meta-llama--Llama-3.3-70B-Instruct") in line  # where it was read
    assert line.endswith("TP sizes that fit site aurora (12 devices per node): 1, 2, 4, 8"), line
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # nothing written


def test_tp_flag_is_checked_and_sizes_follow_the_site(capsys):
    code, _, err = run_cli(capsys, "plan", "--site", "h200", "--model", "zai-org/GLM-4.6", "--tp", "5")
    assert code == 2
    assert err.strip().endswith("(8 devices per node): 1, 2, 3, 4, 6, 8, 16, 24, 32, 48, 96"), err
    assert valid_tp_sizes(64, 12) == [1, 2, 4, 8]
    assert valid_tp_sizes(128, 4) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_pp_larger_than_the_layers_is_refused(capsys):
    code, out, err = run_cli(capsys, "plan", "--site", "h200", "--model", "meta-llama/Llama-3.1-8B-Instruct",
                             "--tp", "8", "--pp", "40")
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1
    assert "pipeline_parallel_size 40 is more than the 32 hidden layers of meta-llama/Llama-3.1-8B-Instruct " \
           "(num_hidden_layers in " in err
    assert err.strip().endswith("use at most 32")
    code, _, err = run_cli(capsys, "plan", "--site", "h200", "--model", "meta-llama/Llama-3.1-8B-Instruct",
                           "--tp", "8", "--pp", "32")
    assert code == 0, err


def test_multimodal_values_come_from_text_config(capsys, tmp_path):
    """vLLM checks the language model's heads (get_hf_text_config), not the vision tower's."""
    model = tmp_path / "vlm"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "text_config": {"num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 48},
        "vision_config": {"num_attention_heads": 16, "num_hidden_layers": 24}}))
    shape = read_shape(model / "config.json")
    assert (shape.heads, shape.kv_heads, shape.layers) == (40, 8, 48)
    code, _, err = run_cli(capsys, "plan", "--site", "h200", "--model", str(model), "--tp", "6")
    assert code == 2
    assert "does not divide the 40 attention heads" in err and "text_config.num_attention_heads in" in err
    assert err.strip().endswith("(8 devices per node): 1, 2, 4, 5, 8, 40"), err
    code, _, err = run_cli(capsys, "plan", "--site", "h200", "--model", str(model), "--tp", "4")
    assert code == 0 and err == ""


def test_config_is_found_in_model_source_and_refs_main_wins(tmp_path):
    repo = tmp_path / "weights" / "models--org--m"
    for rev, heads in (("old", 64), ("new", 48)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text(json.dumps({"num_attention_heads": heads}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("old")
    path, looked = find_config("org/m", model_source=str(repo))
    assert path == repo / "snapshots" / "old" / "config.json" and looked == [str(repo)]
    path, _ = find_config("org/m", model_source=str(tmp_path / "weights"))  # a hub folder holding the repo
    assert path == repo / "snapshots" / "old" / "config.json"
    path, looked = find_config("org/m", hf_home=str(tmp_path / "hf"))  # hf_home first, then HF_HOME
    assert path is None and looked[:2] == [str(tmp_path / "hf" / "hub"), str(FIXTURES / "hub")]


# --------------------------------------------------------------------------- warnings, never errors


def test_unreadable_config_warns_once_and_the_plan_goes_on(capsys, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cfg = write(tmp_path, f"""\
        site: aurora
        models:
          - {{model: org/broken, model_source: {broken}, instances: 3, tensor_parallel_size: 4}}
          - {{model: org/absent, instances: 2, tensor_parallel_size: 2}}
          - {{model: org/absent, name: again, instances: 2, tensor_parallel_size: 2}}
        """)
    code, out, err = run_cli(capsys, "plan", cfg)
    assert code == 0, err
    assert "site aurora" in out
    found = warnings(err)
    assert len(found) == 2 and len(err.splitlines()) == 2, err  # org/absent, listed twice, is named once
    assert found[0].startswith(f"aegis: warning: model 'broken': cannot read {broken / 'config.json'} "
                               "(not valid JSON"), found[0]
    assert found[1].startswith("aegis: warning: model 'absent': no config.json of org/absent found (looked in "), \
        found[1]
    looked = found[1].split("(looked in ")[1].split(")")[0].split(", ")
    assert looked[-2:] == [str(FIXTURES / "hub"), str(tmp_path / "xdg" / "huggingface" / "hub")], looked
    assert all(w.endswith("tensor_parallel_size and pipeline_parallel_size were not checked against the model")
               for w in found)


def test_a_sweep_warns_once_per_model_not_once_per_point(capsys, tmp_path):
    spec = write(tmp_path, """\
        name: s
        site: aurora
        base: {model: org/absent, instances: 3, tensor_parallel_size: 4}
        axes: {max_num_seqs: [8, 16, 32]}
        bench: {workload: random, input_len: 8, output_len: 8, num_requests: 4, rate: 1}
        """, "spec.yaml")
    code, _, err = run_cli(capsys, "sweep", spec, "--dry-run")
    assert code == 0, err
    assert len([w for w in warnings(err) if "no config.json of org/absent" in w]) == 1, err


def test_tp_across_nodes_warns_with_the_node_local_layout(capsys):
    """vLLM's docs/serving/parallelism_scaling.md: TP = GPUs per node, PP = nodes."""
    code, out, err = run_cli(capsys, "plan", "--site", "h200", "--model", "zai-org/GLM-4.6", "--tp", "16")
    assert code == 0 and "16x1" in out
    assert warnings(err) == ["aegis: warning: model 'glm-4.6': tensor_parallel_size 16 is larger than the 8 devices "
                             "this instance gets on each of its 2 nodes (site h200): their all-reduces cross the "
                             "network on every layer; TP 8 x PP 2 uses the same 16 devices and keeps each "
                             "tensor-parallel group inside a node (vLLM's guidance: TP = GPUs per node, "
                             "PP = nodes)"], err
    code, _, err = run_cli(capsys, "plan", "--site", "aurora", "--model", "meta-llama/Llama-3.1-405B-Instruct",
                           "--tp", "8", "--pp", "3")
    assert code == 0
    assert len(warnings(err)) == 1, err
    assert "does not divide the 12 devices this instance gets on each of its 2 nodes" in err
    assert "some tensor-parallel groups straddle two nodes" in err and "TP 4 x PP 6 uses the same 24" in err
    quiet = [("h200", "zai-org/GLM-4.6", "8", "2"),  # the suggested layouts, and ALCF's for the 405B
             ("aurora", "meta-llama/Llama-3.1-405B-Instruct", "4", "6"),
             ("aurora", "meta-llama/Llama-3.1-405B-Instruct", "8", "2")]  # 8 tiles on each of 2 nodes
    for site, model, tp, pp in quiet:
        code, _, err = run_cli(capsys, "plan", "--site", site, "--model", model, "--tp", tp, "--pp", pp)
        assert code == 0 and err == "", err


# --------------------------------------------------------------------------- the shipped examples and docs


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_layouts_their_models_accept(capsys, example):
    """Every example plans and renders against the recorded configs: no refusal, and every model with
    TP or PP > 1 was found and checked (ALCF's guide and vLLM's check, module docstring)."""
    code, _, err = run_cli(capsys, "plan", example)  # `submit` resolves the same way (tests above)
    assert code == 0, f"{example.name}: {err}"
    assert warnings(err) == [], f"{example.name}: {err}"
    data = yaml.safe_load(example.read_text())
    for spec in data.get("models") or [data]:
        if spec.get("engine") != "sim" and spec.get("tensor_parallel_size", 1) > 1:
            assert find_config(spec["model"], None, data.get("hf_home"))[0] is not None, spec["model"]


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_example_sweeps_use_layouts_their_models_accept(capsys, sweep):
    code, _, err = run_cli(capsys, "sweep", sweep, "--dry-run")
    assert code == 0, f"{sweep.name}: {err}"
    assert warnings(err) == [], f"{sweep.name}: {err}"


def _layouts(node):
    """Every mapping with a model and a tensor_parallel_size inside parsed YAML/JSON."""
    if isinstance(node, dict):
        if isinstance(node.get("model"), str) and "tensor_parallel_size" in node:
            yield node
        for value in node.values():
            yield from _layouts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _layouts(value)


def test_docs_snippets_use_layouts_their_models_accept():
    """The YAML and JSON snippets of README.md and docs/*.md: each known model's TP divides its heads."""
    checked = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for body in re.findall(r"```(?:yaml|json)\n(.*?)```", doc.read_text(), re.S):
            try:
                data = yaml.safe_load(body)  # JSON is YAML
            except yaml.YAMLError:
                continue  # an abbreviated snippet ("...")
            for spec in _layouts(data):
                path, _ = find_config(spec["model"])
                if path is None:
                    continue  # an illustrative id (org/m)
                shape = read_shape(path)
                tp, pp = spec["tensor_parallel_size"], spec.get("pipeline_parallel_size", 1)
                assert shape.heads % tp == 0, f"{doc.name}: {spec['model']} TP {tp} vs {shape.heads} heads"
                assert pp <= shape.layers, f"{doc.name}: {spec['model']} PP {pp} vs {shape.layers} layers"
                checked.append((doc.name, spec["model"], tp))
    assert {name for name, _, _ in checked} >= {"config.md", "engines.md", "placement.md"}, checked
