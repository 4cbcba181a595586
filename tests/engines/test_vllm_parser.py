"""Every vLLM command line aegis renders is parsed by vLLM's own argument parser ("site truth").

The golden files of test_render.py only say "unchanged". Here the argv of every vLLM rank, exactly as the
agent would exec it (tests/engines/rendering.py: site profile -> config -> plan ->
aegis.launch.ranks.build_ranks), is handed to the parsers of the installed vLLM (the CPU build, 0.32,
`vllm_env` fixture), all in ONE subprocess of the vLLM venv's python (tests/engines/vllm_parse.py):

- `python -m vllm.entrypoints.openai.api_server ...` (single-node ranks): in vLLM 0.32 that module's
  `__main__` runs vllm/entrypoints/launchers/api_server/entry.py `main()`, whose parser is
  `make_arg_parser(FlexibleArgumentParser(...))` from vllm/entrypoints/launchers/cli_args.py (0.32 moved
  cli_args.py there from vllm/entrypoints/openai/), followed by `validate_parsed_serve_args` (same file)
  and, before the engine, `validate_api_server_args` (vllm/entrypoints/launchers/launcher.py).
- `vllm serve MODEL ...` (multi-node ranks, the head and the `--headless` followers): the `serve`
  subcommand of vllm/entrypoints/cli/main.py, `ServeSubcommand.subparser_init` / `.validate` in
  vllm/entrypoints/cli/serve.py (the same `make_arg_parser` and `validate_parsed_serve_args`).
- Both then build `AsyncEngineArgs.from_cli_args(args)` (vllm/engine/arg_utils.py), as
  `build_async_engine_client` does, so the values are checked where the engine reads them.

Cases: every shipped site whose device check accepts vLLM (local-sim refuses it) x shape (one node with
two instances; two nodes, head rank and headless rank, where the site allows more than one node) x
feature set (the engine keys of aegis/engines/options.py EngineOptions: LoRA with adapters and limits,
an adapters_dir, prefix caching on and off, each kv_cache_dtype aegis accepts for vLLM, expert parallel,
all2all_backend, EPLB, num_redundant_experts; engine_version unset, i.e. the current spellings).
Checked per argv: vLLM's parser accepts it, vLLM's pre-engine validation passes, no option given is one
vLLM marks deprecated, and the values vLLM holds are the ones aegis meant (model, host, port, parallel
sizes, served name, LoRA modules and limits, prefix caching, KV-cache dtype, expert parallel, all-to-all
backend, EPLB config, nnodes/node_rank/master_addr/master_port/headless, a passed-through extra arg; for
sites that span nodes over Ray (Aurora, Polaris: aegis/engines/ray.py) the `vllm serve` after aegis_raywait.py's
`--`, with --distributed-executor-backend ray and vLLM's single-node defaults for nnodes and node_rank).
vLLM logs no deprecation while parsing them. Negative cases in the same batch prove the check can fail:
an unknown flag (both entry points), a bad all2all_backend value (aegis passes any word through), a bad
integer, and a flag combination that only `validate_parsed_serve_args` refuses. Two known gaps are strict
xfail (it turns into a failure once fixed, so the mark gets removed): the deprecation of the single-node
entry point `python -m vllm.entrypoints.openai.api_server` in 0.32. An adapter path with a comma is
rendered as a JSON item (vLLM reads any item with a comma as JSON).

Cost: one vLLM import (10-20 s on 2 cores) plus ~15 ms per argv (a fresh parser each, as each process
builds its own); about 25-40 s in all for ~350 argvs.

Not checked: vLLM's engine config (`create_engine_config`: it needs the model's HF config and a device
platform; e.g. ParallelConfig refuses EPLB on CPU), whether the model, adapters or network exist, the
ranks' environment (it does not change how vLLM parses), old spellings for `engine_version` before
0.11, and SGLang/TensorRT-LLM (not installed).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from aegis.engines import get_engine
from aegis.engines.options import KV_CACHE_DTYPES
from aegis.launch.ranks import master_port
from aegis.testing.cpu_vllm import VLLM_VERSION
from tests.engines.rendering import EXTRA, KEY, SITES, render_ranks, site_and_hosts

pytestmark = pytest.mark.slow

PARSE_SCRIPT = Path(__file__).with_name("vllm_parse.py")
PARSE_TIMEOUT = 600
MODELS = {"single": "meta-llama/Llama-3.1-8B-Instruct", "multi": "deepseek-ai/DeepSeek-V3"}
ADAPTERS_DIR = "<adapters_dir>"  # replaced by a directory of adapters made for the test
LORA = {"adapters": {"sql": "/adapters/sql", "chat": "/adapters/chat"}, "max_loras": 1, "max_cpu_loras": 2,
        "max_lora_rank": 16}
MOE = {"enable_expert_parallel": True, "all2all_backend": "deepep_low_latency", "enable_eplb": True,
       "num_redundant_experts": 32}
FEATURES: dict[str, dict] = {
    "defaults": {},
    "lora": {"lora": LORA},
    "lora-adapters-only": {"lora": {"adapters": {"sql": "/adapters/sql"}}},
    "lora-adapters-dir": {"lora": {"adapters_dir": ADAPTERS_DIR, "adapters": {"sql": "/adapters/sql"},
                                   "max_lora_rank": 8}},
    "prefix-caching-on": {"enable_prefix_caching": True},
    "prefix-caching-off": {"enable_prefix_caching": False},
    **{f"kv-{dtype}": {"kv_cache_dtype": dtype} for dtype in KV_CACHE_DTYPES["vllm"]},
    "expert-parallel": {"enable_expert_parallel": True},
    "all2all-backend": {"enable_expert_parallel": True, "all2all_backend": "deepep_high_throughput"},
    "eplb": {"enable_expert_parallel": True, "enable_eplb": True},
    "eplb-redundant-0": {"enable_expert_parallel": True, "enable_eplb": True, "num_redundant_experts": 0},
    "moe": MOE,
    "everything": {"lora": LORA, "enable_prefix_caching": False, "kv_cache_dtype": "fp8_e5m2", **MOE},
    "served-name-in-extra-args": {"extra_args": ["--served-model-name", "alias", *EXTRA["vllm"]]},
}
# (id, site, shape, features, what vLLM must answer: (stage, text in the error))
NEGATIVE = [
    ("unknown-flag", "h200", "single", {"extra_args": ["--no-such-flag"]},
     ("parse", "unrecognized arguments: --no-such-flag")),
    ("unknown-flag-serve", "h200", "multi", {"extra_args": ["--no-such-flag"]},
     ("parse", "unrecognized arguments: --no-such-flag")),
    ("bad-all2all-backend", "h200", "multi", {"enable_expert_parallel": True, "all2all_backend": "no_such_backend"},
     ("parse", "argument --all2all-backend: invalid choice: 'no_such_backend'")),
    ("bad-int", "polaris", "single", {"extra_args": ["--max-num-seqs", "many"]},
     ("parse", "argument --max-num-seqs: invalid")),
    ("validation", "aurora", "single", {"extra_args": ["--enable-auto-tool-choice"]},
     ("validate", "--enable-auto-tool-choice requires --tool-call-parser")),
]
# Command lines aegis does not write, for what vLLM accepts: the JSON form of --lora-modules.
CONTROLS = {
    "lora-json": ["/soft/engine/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m",
                  "--enable-lora", "--lora-modules",
                  json.dumps({"name": "sql", "path": "/adapters/sql,v2", "base_model_name": "m"})],
}
# Known: an adapter path with a comma, rendered as name=path, is read by vLLM as JSON and refused.
COMMA_PATH = ("lora-comma-path", "h200", "single", {"lora": {"adapters": {"sql": "/adapters/sql,v2"}}})
ARGS_KEYS = ["model", "model_tag", "host", "port", "served_model_name", "lora_modules", "headless",
             "api_server_count", "subparser"]
ENGINE_KEYS = ["model", "served_model_name", "tensor_parallel_size", "pipeline_parallel_size",
               "enable_prefix_caching", "kv_cache_dtype", "enable_lora", "max_loras", "max_cpu_loras",
               "max_lora_rank", "enable_expert_parallel", "all2all_backend", "enable_eplb", "eplb_config",
               "nnodes", "node_rank", "master_addr", "master_port", "max_num_seqs", "distributed_executor_backend"]


def vllm_sites() -> list[tuple[str, bool]]:
    """(site, allows more than one node) for every shipped site whose device check accepts vLLM."""
    out = []
    for name in SITES:
        site, _ = site_and_hosts(name, "single")
        if get_engine("vllm").check_site(list(site.visibility_env)) is None:
            out.append((name, site.max_nodes is None or site.max_nodes > 1))
    return out


CASES = [(site, shape, feature) for site, multi in vllm_sites() for shape in ("single", "multi")
         if shape == "single" or multi for feature in FEATURES]


def raw_config(shape: str, devices_per_node: int, features: dict, adapters_dir: Path) -> dict:
    raw = {"engine": "vllm", "engine_python": "/soft/engine/bin/python", "model": MODELS[shape],
           "extra_args": list(EXTRA["vllm"])}
    if shape == "single":
        raw["instances"] = 2
    else:
        raw.update(tensor_parallel_size=devices_per_node, pipeline_parallel_size=2)
    raw.update(json.loads(json.dumps(features).replace(ADAPTERS_DIR, str(adapters_dir))))
    return raw


def render_case(case_id: str, site_name: str, shape: str, features: dict, run_dir: Path,
                adapters_dir: Path) -> list[dict]:
    """Every vLLM rank of one config: {"id", "argv", "expect"} with what aegis meant each value to be."""
    site, hosts = site_and_hosts(site_name, shape)
    run_dir.mkdir()
    raw = raw_config(shape, site.devices_per_node, features, adapters_dir)
    rendered = render_ranks(run_dir, site, hosts, raw, KEY)
    assert rendered.refused is None, f"{case_id}: aegis refused: {rendered.refused}"
    spec = rendered.cfg.models[0]
    opts = spec.engine_options()
    adapters = opts.lora.resolved() if opts.lora else {}
    out = []
    for node in rendered.nodes:
        instances = {inst.name: inst for inst in rendered.plan.instances_on(node.index)}
        for rank in node.ranks:
            inst = instances[rank.instance]
            head = inst.placement[0].node
            argv = list(rank.argv)
            ray = "--distributed-executor-backend" in argv
            if "ray" in map(os.path.basename, argv[:3]):  # the head's behind aegis_raystart.py
                continue  # `ray start` of a Ray-backed instance (tests/launch/test_ray_backend.py runs it)
            # vllm serve behind aegis_raywait.py and/or aegis_modelinfo.py (Aurora's known issue): each wrapper
            # execs what follows its "--"; the part after the last wrapper's is what vLLM parses
            while argv[1].endswith(("aegis_raywait.py", "aegis_modelinfo.py")):
                argv = argv[argv.index("--") + 1:]
            spans = len(inst.placement) > 1 and not ray  # vLLM's own multi-node flags (Ray: vLLM's defaults)
            expect = {
                "model": spec.model, "port": inst.port,
                "host": None if site.serve_address.method == "interface" else hosts[node.index],
                "served_model_name": ["alias" if "--served-model-name" in spec.engine_args else spec.model],
                "tensor_parallel_size": inst.tensor_parallel_size,
                "pipeline_parallel_size": inst.pipeline_parallel_size,
                "nnodes": len(inst.placement) if spans else 1, "node_rank": rank.rank, "headless": rank.rank > 0,
                "master_addr": hosts[head] if spans else None,
                "master_port": master_port(inst.port) if spans else None,
                "multi": len(inst.placement) > 1, "backend": "ray" if ray else None,
                "lora_modules": [[name, path] for name, path in adapters.items()],
                "options": opts.model_dump(),
            }
            out.append({"id": f"{case_id}/{rank.key}", "argv": argv, "expect": expect})
    assert out, f"{case_id}: no vLLM ranks rendered"
    return out


def made_up_host(name: str) -> str:
    raise OSError(f"{name}: a made-up host name, not looked up")


@pytest.fixture(scope="module")
def parsed(vllm_env, tmp_path_factory):
    """Render every case, parse all argvs in one vLLM subprocess; (rendered by id, results by argv id, info)."""
    work = tmp_path_factory.mktemp("vllm-parser")
    adapters_dir = work / "adapters"
    for name in ("beta", "alpha"):
        (adapters_dir / name).mkdir(parents=True)
        (adapters_dir / name / "adapter_config.json").write_text("{}")
    rendered: dict[str, list[dict]] = {}
    todo = [(f"{s}-{sh}-{f}", s, sh, FEATURES[f]) for s, sh, f in CASES]
    todo += [(f"negative-{i}", s, sh, feat) for i, s, sh, feat, _ in NEGATIVE] + [COMMA_PATH]
    with pytest.MonkeyPatch.context() as mp:
        # The host names are made up: resolving them (for GLOO_SOCKET_IFNAME/VLLM_HOST_IP, the environment
        # only) waits on DNS for each multi-device rank.
        mp.setattr(socket, "gethostbyname", made_up_host)
        for n, (case_id, site, shape, features) in enumerate(todo):
            rendered[case_id] = render_case(case_id, site, shape, features, work / f"run{n}", adapters_dir)
    batch = [{"id": r["id"], "argv": r["argv"]} for ranks in rendered.values() for r in ranks]
    batch += [{"id": f"control-{k}", "argv": argv} for k, argv in CONTROLS.items()]
    request, result = work / "request.json", work / "result.json"
    request.write_text(json.dumps({"cases": batch, "args_keys": ARGS_KEYS, "engine_keys": ENGINE_KEYS}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")  # offline mode would look the model ids up locally
    t0 = time.monotonic()
    proc = subprocess.run([str(vllm_env.python), str(PARSE_SCRIPT), str(request), str(result)], env=env,
                          capture_output=True, text=True, timeout=PARSE_TIMEOUT, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"{PARSE_SCRIPT.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    out = json.loads(result.read_text())
    print(f"vLLM {out['vllm']}: {len(batch)} argvs parsed in one subprocess in {elapsed:.1f} s "
          f"(import {out['import_s']} s, parsing {out['parse_s']} s)")
    return rendered, out["results"], {"vllm": out["vllm"], "elapsed": elapsed, "argvs": len(batch),
                                       "api_server_warnings": out["api_server_warnings"]}


def check_values(argv_id: str, got: dict, expect: dict) -> None:
    """The values vLLM parsed are the ones aegis meant."""
    args, eng, opts = got["args"], got["engine"], expect["options"]
    where = f"{argv_id}: vLLM parsed"
    assert eng["model"] == expect["model"], f"{where} model {eng['model']!r}"
    if expect["host"] is not None:
        assert args["host"] == expect["host"], f"{where} host {args['host']!r}, aegis meant {expect['host']!r}"
    assert args["port"] == expect["port"], f"{where} port {args['port']!r}, aegis meant {expect['port']!r}"
    assert eng["served_model_name"] == expect["served_model_name"] == args["served_model_name"], where
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes", "node_rank"):
        assert eng[key] == expect[key], f"{where} {key} {eng[key]!r}, aegis meant {expect[key]!r}"
    assert args["headless"] is expect["headless"], f"{where} headless {args['headless']!r}, aegis meant " \
        f"{expect['headless']!r}"
    if expect["multi"]:
        assert got["entry"] == "serve" and args["subparser"] == "serve" and args["model_tag"] == expect["model"]
    else:
        assert got["entry"] == "api_server" and args["model"] == expect["model"]
    if expect["nnodes"] > 1:
        for key in ("master_addr", "master_port"):
            assert eng[key] == expect[key], f"{where} {key} {eng[key]!r}, aegis meant {expect[key]!r}"
    # ALCF's vLLM page (Aurora, multi-node): `vllm serve ... --distributed-executor-backend ray`
    assert eng["distributed_executor_backend"] == expect["backend"], f"{where} distributed_executor_backend"
    assert eng["max_num_seqs"] == 128, f"{where} max_num_seqs {eng['max_num_seqs']!r} (extra_args)"
    assert eng["enable_prefix_caching"] is opts["enable_prefix_caching"], \
        f"{where} enable_prefix_caching {eng['enable_prefix_caching']!r}"  # None: vLLM decides
    assert eng["kv_cache_dtype"] == (opts["kv_cache_dtype"] or "auto"), f"{where} kv_cache_dtype"
    lora = opts["lora"]
    assert bool(eng["enable_lora"]) is (lora is not None), f"{where} enable_lora {eng['enable_lora']!r}"
    modules = [[m["name"], m["path"]] for m in args["lora_modules"] or []]
    assert modules == expect["lora_modules"], f"{where} lora_modules {modules}"
    for key in ("max_loras", "max_cpu_loras", "max_lora_rank"):
        if lora and lora[key] is not None:
            assert eng[key] == lora[key], f"{where} {key} {eng[key]!r}, aegis meant {lora[key]!r}"
    assert eng["enable_expert_parallel"] is opts["enable_expert_parallel"], f"{where} enable_expert_parallel"
    if opts["all2all_backend"]:
        assert eng["all2all_backend"] == opts["all2all_backend"], f"{where} all2all_backend"
    assert eng["enable_eplb"] is opts["enable_eplb"], f"{where} enable_eplb"
    assert eng["eplb_config"]["num_redundant_experts"] == (opts["num_redundant_experts"] or 0), \
        f"{where} eplb_config {eng['eplb_config']!r}"


@pytest.mark.parametrize("site,shape,feature", CASES, ids=[f"{s}-{sh}-{f}" for s, sh, f in CASES])
def test_vllm_parses_what_aegis_renders(parsed, site, shape, feature):
    rendered, results, _ = parsed
    for rank in rendered[f"{site}-{shape}-{feature}"]:
        got = results[rank["id"]]
        assert got["ok"], f"{rank['id']}: vLLM refused at {got['stage']}: {got['error']}\nargv: {rank['argv']}"
        assert not got["deprecated"], f"{rank['id']}: options vLLM marks deprecated: {got['deprecated']}"
        check_values(rank["id"], got, rank["expect"])


@pytest.mark.parametrize("case", NEGATIVE, ids=[c[0] for c in NEGATIVE])
def test_vllm_refuses_bad_command_lines(parsed, case):
    """The check can fail: vLLM's own parser or validation refuses these, with its own message."""
    rendered, results, _ = parsed
    case_id, _, _, _, (stage, text) = case
    for rank in rendered[f"negative-{case_id}"]:
        got = results[rank["id"]]
        assert not got["ok"], f"{rank['id']}: vLLM accepted {rank['argv']}"
        assert got["stage"] == stage and text in got["error"], f"{rank['id']}: {got['stage']}: {got['error']}"


def test_vllm_lora_modules_json_form(parsed):
    """vLLM's other --lora-modules form (JSON, which a path with a comma needs) parses as vLLM documents."""
    got = parsed[1]["control-lora-json"]
    assert got["ok"], got["error"]
    modules = [{k: m[k] for k in ("name", "path", "base_model_name")} for m in got["args"]["lora_modules"]]
    assert modules == [{"name": "sql", "path": "/adapters/sql,v2", "base_model_name": "m"}]


def test_vllm_lora_adapter_path_with_comma(parsed):
    rendered, results, _ = parsed
    for rank in rendered[COMMA_PATH[0]]:
        got = results[rank["id"]]
        assert got["ok"], f"{rank['id']}: vLLM refused at {got['stage']}: {got['error']}"


def test_no_deprecation_warnings(parsed):
    """vLLM logs no deprecation while it parses aegis's command lines (e.g. `vllm serve --model M`)."""
    rendered, results, _ = parsed
    lines = sorted({line for case_id, ranks in rendered.items() if not case_id.startswith(("negative-", "lora-comma"))
                    for rank in ranks for line in results[rank["id"]]["log"]
                    if re.search(r"deprecat|will be removed|no longer", line, re.I)})
    assert not lines, "vLLM warned while parsing aegis's command lines:\n" + "\n".join(lines)


@pytest.mark.xfail(strict=True, reason="vLLM 0.32 deprecates `python -m vllm.entrypoints.openai.api_server` "
                                       "(aegis's single-node entry point, aegis/engines/vllm.py) for `vllm serve`")
def test_single_node_entry_point_is_not_deprecated(parsed):
    assert not parsed[2]["api_server_warnings"], parsed[2]["api_server_warnings"]


def test_one_subprocess_of_the_installed_vllm(parsed):
    """The batch ran in vLLM VLLM_VERSION (the version the sources cited above are from)."""
    info = parsed[2]
    assert info["vllm"].split("+")[0] == VLLM_VERSION, info
    assert info["argvs"] > len(CASES), info
