"""Each shipped site renders what its centre documents (issue 13; ../shared/SITE-AUDIT.md has the findings).

Every row below is a fact from the centre's own documentation, with its source, checked against what
aegis renders: the job script, the launcher step, the engines' environment and cores, the queue it picks.
Sources (read at the commits named; the URLs are the published pages):
  ALCF-AJ  https://docs.alcf.anl.gov/aurora/running-jobs-aurora/  (argonne-lcf/user-guides 0037d9f)
  ALCF-AV  https://docs.alcf.anl.gov/aurora/data-science/inference/vllm/  (7d04a3f)
  ALCF-AK  https://docs.alcf.anl.gov/aurora/known-issues/  (§7 TMPDIR)
  ALCF-PJ  https://docs.alcf.anl.gov/polaris/running-jobs/  (11dbfa6), .../polaris/running-jobs/using-gpus/
  ALCF-PV  https://docs.alcf.anl.gov/polaris/data-science/frameworks/vllm/
  OLCF-FG  https://docs.olcf.ornl.gov/systems/frontier_user_guide.html  (olcf/olcf-user-docs 2745903)
  OLCF-PT  https://docs.olcf.ornl.gov/software/analytics/pytorch_frontier.html
  VLLM     https://docs.vllm.ai/en/latest/serving/parallelism_scaling.html
  NV-MLP   NVIDIA's 8x H200 system in MLPerf Inference v4.1: mlcommons/inference_results_v4.1
           closed/NVIDIA/systems/H200-SXM-141GBx8_TRT.json (a DGX H200 host: 2x Xeon Platinum 8480C, 56 cores each)
"""
from __future__ import annotations

import shlex

import pytest

from aegis.config.schema import resolve
from aegis.config.sites import load_site, parse_ranges
from aegis.launch.ranks import build_ranks
from aegis.launch.steps import per_node_step
from aegis.plan.placement import make_plan
from aegis.rundir import RunDir
from tests.core.helpers import run_cli, write

HOSTS = {"aurora": ["x4102c5s2b0n0", "x4102c5s2b0n1"], "polaris": ["x3004c0s7b0n0", "x3004c0s7b0n1"],
         "frontier": ["frontier00001", "frontier00002"], "h200": ["gpu-a01", "gpu-a02"]}


def job_script(tmp_path, capsys, site: str, nodes: int, walltime: str, extra: str = "") -> tuple[int, str, str]:
    """`aegis submit --dry-run` of `nodes` one-instance-per-node TP-(node size) instances."""
    n = load_site(site).devices_per_node
    cfg = write(tmp_path, f"site: {site}\nmodel: m/x\naccount: P1\nwalltime: \"{walltime}\"\n"
                          f"tensor_parallel_size: {n}\ninstances: {nodes}\n{extra}")
    return run_cli(capsys, "submit", cfg, "--dry-run")


def directives(script: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1:] for line in script.splitlines() if line.startswith(prefix + " ")]


def engine_ranks(tmp_path, site_name: str, raw: dict, index: int = 0):
    site = load_site(site_name).resolved()
    cfg = resolve(raw)
    plan = make_plan(site, cfg, nodes=2)
    addresses = [site.serve_address.address(h) for h in HOSTS[site_name]]  # as the head computes them
    return build_ranks(RunDir(tmp_path), index, site, cfg, plan, addresses, "k3y")


# --------------------------------------------------------------------------- queues

# (site, nodes, walltime, the queue directive the centre's table allows; None: no queue takes it)
QUEUES = [
    # ALCF-AJ "Queues": debug 1-2 nodes <= 1 h; debug-scaling 2-31 <= 1 h; prod routes 1-512 <= 6 h,
    # 513-1024 <= 12 h, 1025-1919 <= 18 h, 1920-7300 <= 24 h.
    ("aurora", 1, "00:30:00", "-q debug"),
    ("aurora", 3, "00:30:00", "-q debug-scaling"),
    ("aurora", 3, "02:00:00", "-q prod"),          # SITE-AUDIT: aegis used to send this to debug
    ("aurora", 600, "10:00:00", "-q prod"),
    ("aurora", 600, "13:00:00", None),
    # ALCF-PJ "Queues": debug 1-2 <= 1 h; debug-scaling 1-10 <= 1 h; prod 10-24 <= 3 h, 25-99 <= 6 h,
    # 100-496 <= 24 h; capacity 1-4 <= 168 h.
    ("polaris", 2, "01:00:00", "-q debug"),
    ("polaris", 3, "00:30:00", "-q debug-scaling"),
    ("polaris", 3, "02:00:00", "-q capacity"),
    ("polaris", 12, "02:00:00", "-q prod"),
    ("polaris", 6, "02:00:00", None),
    # OLCF-FG "Job Priority by Node Count" (batch: 1-91 nodes <= 2 h, 92-183 <= 6 h, 184+ <= 12 h) and
    # "extended Partition": <= 64 nodes, <= 24 h.
    ("frontier", 1, "02:00:00", "--partition=batch"),
    ("frontier", 100, "06:00:00", "--partition=batch"),
    ("frontier", 4, "20:00:00", "--partition=extended"),
    ("frontier", 100, "20:00:00", None),
]


@pytest.mark.parametrize("site,nodes,walltime,expected", QUEUES)
def test_queue_follows_the_centres_table(tmp_path, capsys, site, nodes, walltime, expected):
    code, out, err = job_script(tmp_path, capsys, site, nodes, walltime)
    if expected is None:
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and f"no queue of site {site} takes {nodes} node(s) for {walltime}" in err
        assert "Traceback" not in err
        return
    assert code == 0, err
    prefix = "#PBS" if site != "frontier" else "#SBATCH"
    queue = [d for d in directives(out, prefix) if d.startswith(("-q ", "--partition="))]
    assert queue == [expected]


def test_a_named_queue_is_checked_against_its_limits(tmp_path, capsys):
    code, out, err = job_script(tmp_path, capsys, "aurora", 3, "02:00:00", "queue: debug\n")
    assert code == 2 and out == ""
    assert "queue 'debug' of site aurora does not take 3 node(s) for 02:00:00" in err and "use queue prod" in err
    # A queue the profile does not list (a reservation, a new queue) is passed through as given.
    code, out, err = job_script(tmp_path, capsys, "aurora", 3, "02:00:00", "queue: R1234567\n")
    assert code == 0 and "#PBS -q R1234567" in out


def test_frontier_debug_is_a_qos_not_a_partition(tmp_path, capsys):
    """OLCF-FG "debug Quality of Service Class": `#SBATCH -q debug`, walltime at most 2 hours."""
    code, out, err = job_script(tmp_path, capsys, "frontier", 2, "01:00:00", "queue: debug\n")
    assert code == 0, err
    d = directives(out, "#SBATCH")
    assert "--partition=batch" in d and "--qos=debug" in d
    code, _, err = job_script(tmp_path, capsys, "frontier", 2, "03:00:00", "queue: debug\n")
    assert code == 2 and "queue 'debug' of site frontier does not take 2 node(s) for 03:00:00" in err


# --------------------------------------------------------------------------- job scripts


def test_aurora_job_script(tmp_path, capsys):
    """ALCF-AJ "Submitting a job": #!/bin/bash -l, -A, -l walltime, -l filesystems, -l place=scatter, -q."""
    code, out, err = job_script(tmp_path, capsys, "aurora", 2, "00:30:00")
    assert code == 0, err
    assert out.startswith("#!/bin/bash -l\n")
    d = directives(out, "#PBS")
    for expected in ("-A P1", "-l select=2", "-l walltime=00:30:00", "-l filesystems=flare:home",
                     "-l place=scatter", "-q debug"):
        assert expected in d, (expected, d)
    assert "module load frameworks" in out  # ALCF-AV: vLLM comes with the frameworks module


def test_polaris_job_script_activates_conda_before_set_u(tmp_path, capsys):
    """ALCF-PV: `module use /soft/modulefiles; module load conda; conda activate`; ALCF-PJ: select=N:system=polaris,
    filesystems home:eagle. Activation scripts may read unset variables (conda/conda#8186): before `set -u`."""
    code, out, err = job_script(tmp_path, capsys, "polaris", 2, "00:30:00")
    assert code == 0, err
    d = directives(out, "#PBS")
    assert "-l select=2:system=polaris" in d and "-l filesystems=home:eagle" in d and "-l place=scatter" in d
    lines = out.splitlines()
    setup = [lines.index(x) for x in ("module use /soft/modulefiles", "module load conda", "conda activate")]
    assert setup == sorted(setup) and setup[-1] < lines.index("set -u")


@pytest.mark.parametrize("staging", [True, False])
def test_frontier_asks_for_the_nvme_only_when_it_stages(tmp_path, capsys, staging):
    """OLCF-FG "NVMe": the node-local NVMe at /mnt/bb/<userid> exists only with `-C nvme`."""
    source = tmp_path / "weights"
    source.mkdir()
    code, out, err = job_script(tmp_path, capsys, "frontier", 1, "01:00:00",
                                f"model_source: {source}\n" if staging else "")
    assert code == 0, err
    assert ("-C nvme" in directives(out, "#SBATCH")) is staging
    assert load_site("frontier").local_storage == "/mnt/bb/$USER"


def test_frontier_modules_are_the_documented_versions(tmp_path, capsys):
    """OLCF-PT: PrgEnv-gnu/8.7.0, cpe/26.03, rocm/7.1.1, rccl-net-plugin after rocm, craype-accel-amd-gfx90a,
    and LD_LIBRARY_PATH with CRAY_LD_LIBRARY_PATH first "because using a non-default CPE"."""
    setup = load_site("frontier").setup
    modules = shlex.split(setup[0])[2:]
    assert modules[:3] == ["PrgEnv-gnu/8.7.0", "cpe/26.03", "rocm/7.1.1"]
    assert modules.index("rccl-net-plugin") > modules.index("rocm/7.1.1")
    assert "craype-accel-amd-gfx90a" in modules
    assert setup[1].startswith('export LD_LIBRARY_PATH="$CRAY_LD_LIBRARY_PATH:')


def test_submit_without_an_account_is_one_line_on_sites_that_require_one(tmp_path, capsys):
    """ALCF-AJ and OLCF-FG: the project (-A) is required; qsub/sbatch would reject the job later."""
    cfg = write(tmp_path, "site: aurora\nmodel: m/x\n")
    code, out, err = run_cli(capsys, "submit", cfg, "--run-dir", tmp_path / "run")
    assert code == 2 and err.strip() == ("aegis: error: site aurora needs a project to charge: set account: "
                                         "in the config or pass --account NAME")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- launcher steps


@pytest.mark.parametrize("site,expected", [
    # OLCF-FG: srun's default is `-c 1 --cpu-bind=threads` (one hardware thread per task); OLCF's vLLM
    # example gives its one-per-node server `-c56`. The agent must get the node, unbound.
    ("frontier", ["--cpus-per-task=56", "--cpu-bind=none"]),
    ("h200", ["--cpus-per-task=112", "--cpu-bind=none"]),  # NV-MLP: 2 x 56 cores (DGX H200)
    # ALCF-AJ: `mpiexec -n N -ppn P --cpu-bind ...`; one agent per node, not bound (it binds its engines).
    ("aurora", ["--ppn", "1", "--cpu-bind", "none"]),
    ("polaris", ["--ppn", "1", "--cpu-bind", "none"]),
])
def test_one_agent_per_node_with_the_whole_node(site, expected):
    argv = per_node_step(load_site(site), 4, ["AGENT"])
    assert argv[-1] == "AGENT"
    joined = " ".join(argv)
    assert " ".join(expected) in joined
    if argv[0] == "srun":
        assert "--ntasks-per-node=1" in argv and "--nodes=4" in argv
        cpus = int(next(a for a in argv if a.startswith("--cpus-per-task=")).split("=")[1])
        site_ = load_site(site)
        planned = {c for d in range(site_.devices_per_node) for c in site_.cpus_of_device(d)}
        assert len(planned) <= cpus  # every core the plan binds engines to is in the step
    else:
        assert argv[:3] == ["mpiexec", "-n", "4"]


# NV-MLP (H200-SXM-141GBx8_TRT.json): "host_processor_model_name": "Intel(R) Xeon(R) Platinum 8480C",
# "host_processors_per_node": 2, "host_processor_core_count": 56, "accelerators_per_node": 8.
DGX_H200 = {"sockets": 2, "cores_per_socket": 56, "gpus": 8}


def test_h200_is_shaped_like_a_dgx_h200(tmp_path):
    """NV-MLP: 8 GPUs and 2 x 56 cores per node. GPUs 0-3 get socket 0's cores (0-55), 4-7 socket 1's (56-111),
    the agent step gets all 112, and a TP-8 instance is bound to all of them (TP 4: one socket each)."""
    site = load_site("h200")
    cores = DGX_H200["sockets"] * DGX_H200["cores_per_socket"]
    assert site.devices_per_node == DGX_H200["gpus"] and len(site.domain_list()) == DGX_H200["sockets"]
    per = DGX_H200["cores_per_socket"]
    for gpu in range(DGX_H200["gpus"]):
        socket_ = gpu // (DGX_H200["gpus"] // DGX_H200["sockets"])
        assert set(site.cpus_of_device(gpu)) <= set(range(socket_ * per, (socket_ + 1) * per))
    assert {c for g in range(DGX_H200["gpus"]) for c in site.cpus_of_device(g)} == set(range(cores))
    assert f"--cpus-per-task={cores}" in per_node_step(site, 2, ["AGENT"])
    whole, = engine_ranks(tmp_path, "h200", {"model": "m/x", "tensor_parallel_size": 8})
    assert whole.cpus == list(range(cores))
    halves = engine_ranks(tmp_path, "h200", {"model": "m/x", "tensor_parallel_size": 4, "instances": 2})
    assert [r.cpus for r in halves] == [list(range(0, per)), list(range(per, cores))]


# --------------------------------------------------------------------------- engines


def test_aurora_engine_environment_and_cores(tmp_path):
    """ALCF-AJ: ZE_FLAT_DEVICE_HIERARCHY=FLAT with plain tile indices in ZE_AFFINITY_MASK,
    ZE_ENABLE_PCI_ID_DEVICE_ORDER=1, cores 0 and 52 reserved, tiles 0-5 on socket 0 (cores 1-51);
    ALCF-AK §7: TMPDIR=/tmp; ALCF-AV: VLLM_HOST_IP on <host>.hsn.cm.aurora.alcf.anl.gov for TP > 1
    and no_proxy=localhost,127.0.0.1; vLLM 0.15.0."""
    ranks = engine_ranks(tmp_path, "aurora", {"model": "m/x", "instances": 3, "tensor_parallel_size": 4})
    assert [r.env["ZE_AFFINITY_MASK"] for r in ranks] == ["0,1,2,3", "4,5,6,7", "8,9,10,11"]
    for r in ranks:
        assert r.env["ZE_FLAT_DEVICE_HIERARCHY"] == "FLAT" and r.env["ZE_ENABLE_PCI_ID_DEVICE_ORDER"] == "1"
        assert r.env["TMPDIR"] == "/tmp" and r.env["no_proxy"] == "localhost,127.0.0.1"
        assert r.env["https_proxy"] == "http://proxy.alcf.anl.gov:3128"
        assert 0 not in r.cpus and 52 not in r.cpus
        assert r.argv[r.argv.index("--host") + 1] == "x4102c5s2b0n0.hsn.cm.aurora.alcf.anl.gov"
    # ALCF-AJ: one rank per tile bound with --cpu-bind=list:1-8:9-16:17-24:25-32:33-40:41-48:53-60:...:93-100
    alcf = "1-8:9-16:17-24:25-32:33-40:41-48:53-60:61-68:69-76:77-84:85-92:93-100".split(":")
    site = load_site("aurora")
    assert [site.cpus_of_device(t) for t in range(12)] == [parse_ranges(c) for c in alcf]
    assert ranks[0].cpus == parse_ranges("1-32")
    assert load_site("aurora").engine_versions["vllm"] == "0.15.0"


# ALCF-AV "Serving Large Models on Multiple Tiles and Nodes" and its setup_ray_cluster.sh (user-guides
# docs/aurora/data-science/inference/, 7d04a3f): the variables setup_environment() exports for Ray and oneCCL.
ALCF_RAY_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_EXPERIMENTAL_NOSET_ONEAPI_DEVICE_SELECTOR": "1",
                "CCL_ZE_IPC_EXCHANGE": "sockets", "CCL_PROCESS_LAUNCHER": "hydra", "OMP_NUM_THREADS": "8",
                "TORCH_LLM_ALLREDUCE": "1", "TMPDIR": "/tmp", "RAY_TMPDIR": "/tmp"}


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_aurora_runs_alcfs_multi_node_layout_over_ray(tmp_path):
    """ALCF-AV "Serving Large Models": "To serve models across multiple nodes, vLLM uses Ray"; Llama-3.1-405B with
    TP 8 x PP 2 on 2 nodes; setup_ray_cluster.sh: `ray start --num-gpus=8 --num-cpus=64 --head
    --node-ip-address=$HSN_IP_ADDRESS`, workers `ray start ... --address=$RAY_HEAD_IP:<port>`, then on the head
    `vllm serve ... --tensor-parallel-size 8 --pipeline-parallel-size 2 --distributed-executor-backend ray`."""
    raw = {"model": "meta-llama/Llama-3.1-405B-Instruct", "tensor_parallel_size": 8, "pipeline_parallel_size": 2}
    ray_head, serve = engine_ranks(tmp_path, "aurora", raw, 0)
    worker, = engine_ranks(tmp_path, "aurora", raw, 1)
    assert load_site("aurora").multinode_backends == {"vllm": "ray"}
    assert ray_head.part == "ray-head" and serve.head and not worker.head
    head_hsn = "x4102c5s2b0n0.hsn.cm.aurora.alcf.anl.gov"
    head_start = ray_head.argv[ray_head.argv.index("start") - 1:]  # behind aegis_raystart.py (its client port)
    assert head_start[0].split("/")[-1] == "ray" and ray_head.argv[1].endswith("/aegis_raystart.py")
    assert head_start[1:3] == ["start", "--head"] and worker.argv[1:3] == ["start", "--address"]
    assert flag(worker.argv, "--address") == f"{head_hsn}:{flag(ray_head.argv, '--port')}"
    for r in (ray_head, worker):
        assert flag(r.argv, "--num-gpus") == "8" and flag(r.argv, "--num-cpus") == "64"
        assert "--block" in r.argv and "k3y" not in " ".join(r.argv) and "VLLM_API_KEY" not in r.env
    wait = serve.argv[serve.argv.index("--") + 1:]  # the Ray wait execs the model-info fill, which execs vLLM
    assert wait[1].endswith("aegis_modelinfo.py")
    server = wait[wait.index("--") + 1:]
    assert server[1:3] == ["serve", "meta-llama/Llama-3.1-405B-Instruct"]
    assert flag(server, "--tensor-parallel-size") == "8" and flag(server, "--pipeline-parallel-size") == "2"
    assert flag(server, "--distributed-executor-backend") == "ray" and "--nnodes" not in server
    for r in (ray_head, serve, worker):
        assert r.env["ZE_AFFINITY_MASK"] == "0,1,2,3,4,5,6,7"
        assert {k: r.env[k] for k in ALCF_RAY_ENV} == ALCF_RAY_ENV


def test_aurora_fills_vllms_model_info_cache_before_the_server(tmp_path):
    """ALCF-AV "Known Issue": "a known issue related to populating the `modelinfos` in the `VLLM_CACHE_ROOT`
    directory to run a model for the first time, which manifests as a `validation error for ModelConfig`. The
    workaround for this issue is to pre-populate the configs". On Aurora every vLLM server starts behind
    aegis_modelinfo.py (which fills them in-process, then execs the server); nowhere else."""
    for site in ("a", "polaris", "frontier", "h200"):
        (tmp_path / site).mkdir()
    rank, = engine_ranks(tmp_path / "a", "aurora", {"model": "meta-llama/Llama-3.1-8B-Instruct"}, 0)
    assert rank.argv[1].endswith("aegis_modelinfo.py") and flag(rank.argv, "--model") == \
        "meta-llama/Llama-3.1-8B-Instruct"
    server = rank.argv[rank.argv.index("--") + 1:]
    assert server[0] == rank.argv[0] and server[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    for site in ("polaris", "frontier", "h200"):
        other, = engine_ranks(tmp_path / site, site, {"model": "meta-llama/Llama-3.1-8B-Instruct"}, 0)
        assert not any(a.endswith("aegis_modelinfo.py") for a in other.argv), site


def test_polaris_engine_environment_and_vllm_version(tmp_path, capsys):
    """ALCF-PJ using-gpus: GPU 0 is closest to cores 24-31, GPU 3 to 0-7; ALCF-PV: vLLM 0.11.0 in the conda module,
    which predates vLLM's --nnodes (vllm-project/vllm#23691), and Ray across nodes ("Serving Large Models on
    Multiple GPUs and Nodes", setup_ray_cluster.sh `--num-gpus=4 --num-cpus=32`): Polaris spans nodes over Ray;
    vLLM's native mode is refused there in one line."""
    ranks = engine_ranks(tmp_path, "polaris", {"model": "m/x", "instances": 4})
    assert [(r.env["CUDA_VISIBLE_DEVICES"], r.cpus) for r in ranks] == [
        ("0", list(range(24, 32))), ("1", list(range(16, 24))), ("2", list(range(8, 16))), ("3", list(range(0, 8)))]
    assert all(r.env["TMPDIR"] == "/tmp" for r in ranks)
    assert ranks[0].argv[ranks[0].argv.index("--host") + 1] == "x3004c0s7b0n0.hsn.cm.polaris.alcf.anl.gov"
    cfg = write(tmp_path, "site: polaris\nmodel: m/x\ntensor_parallel_size: 4\npipeline_parallel_size: 2\n")
    code, out, err = run_cli(capsys, "plan", cfg)
    assert code == 0, err
    ray_head, _ = engine_ranks(tmp_path, "polaris", {"model": "m/x", "tensor_parallel_size": 4,
                                                     "pipeline_parallel_size": 2})
    assert flag(ray_head.argv, "--num-gpus") == "4" and flag(ray_head.argv, "--num-cpus") == "32"
    assert ray_head.env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    cfg = write(tmp_path, "site: polaris\nmodel: m/x\ntensor_parallel_size: 4\npipeline_parallel_size: 2\n"
                          "multinode_backend: native\n")
    code, out, err = run_cli(capsys, "plan", cfg)
    assert code == 2 and "vLLM 0.11.0 has no multi-node mode" in err and err.count("\n") == 1


def test_frontier_engine_environment_and_gcd_cores(tmp_path):
    """OLCF-FG "Frontier Compute Nodes": GCD 4 on cores 0-7, 5 on 8-15, 2 on 16-23, 3 on 24-31, 6 on 32-39,
    7 on 40-47, 0 on 48-55, 1 on 56-63, the first core of each L3 region reserved (low-noise mode);
    ROCR_VISIBLE_DEVICES; OLCF-PT: NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3."""
    ranks = engine_ranks(tmp_path, "frontier", {"model": "m/x", "instances": 8})
    documented = {4: 0, 5: 8, 2: 16, 3: 24, 6: 32, 7: 40, 0: 48, 1: 56}
    for r in ranks:
        gcd = int(r.env["ROCR_VISIBLE_DEVICES"])
        first = documented[gcd]
        assert r.cpus == list(range(first + 1, first + 8))
        assert r.env["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1,hsn2,hsn3"


def test_plan_commands_show_alcfs_recipe_as_shell(tmp_path, capsys):
    """`aegis plan --commands` on Aurora, TP 8 x PP 2 over Ray (ALCF-AV): every rank's command with the
    high-speed-network address rule ALCF's page uses for VLLM_HOST_IP (getent on
    <host>.hsn.cm.aurora.alcf.anl.gov), valid bash."""
    import subprocess

    cfg = write(tmp_path, "site: aurora\nmodel: m/x\ntensor_parallel_size: 8\npipeline_parallel_size: 2\n")
    code, out, err = run_cli(capsys, "plan", cfg, "--commands")
    assert code == 0, err
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    assert 'mapfile -t H < <(sort -u "$PBS_NODEFILE")' in out
    assert "mpiexec -n 2 --ppn 1 --cpu-bind none" in out
    worker = [line for line in out.splitlines() if "ray start --address" in line]
    assert len(worker) == 1 and "# x-0 rank 0 (ray-head)" in out
    assert '--address "${NODE_0}.hsn.cm.aurora.alcf.anl.gov:28000"' in worker[0]
    assert '--node-ip-address "$(getent ahostsv4 ${NODE_1}.hsn.cm.aurora.alcf.anl.gov' in worker[0]
    assert "--distributed-executor-backend ray" in out
    assert "VLLM_HOST_IP=\"$(getent ahostsv4 ${NODE_1}.hsn.cm.aurora.alcf.anl.gov" in worker[0]
    assert "ZE_AFFINITY_MASK=0,1,2,3,4,5,6,7" in worker[0]
