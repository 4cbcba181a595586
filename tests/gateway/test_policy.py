"""The gateway's routing rules (fast): prefix affinity, its yield to load, rendezvous stability, retries order."""
from __future__ import annotations

import json
import time

from aegis.gateway.backends import Backend, Pool, RunFollower, write_drain
from aegis.gateway.policy import BALANCE_ABS, PREFIX_CHARS, Chooser, prefix_key
from aegis.rundir import RunDir


def backends(n: int) -> list[Backend]:
    return [Backend("/runs/a", f"i{k}", f"http://127.0.0.1:{9000 + k}", "m", (), None) for k in range(n)]


def test_cache_aware_sends_one_prefix_to_one_instance_and_spreads_prefixes():
    bs, ch = backends(4), Chooser("cache_aware")
    system = "You are a careful assistant. " * 20  # longer than PREFIX_CHARS: the suffix does not matter
    picks = {ch.order(bs, {"prompt": system + f"question {i}"})[0].name for i in range(50)}
    assert len(picks) == 1
    spread = {ch.order(bs, {"prompt": f"{i} " + "x" * 300})[0].name for i in range(200)}
    assert spread == {b.name for b in bs}  # distinct prefixes land on every instance


def test_cache_aware_yields_to_load_beyond_both_thresholds():
    bs, ch = backends(2), Chooser("cache_aware")
    doc = {"prompt": "same prefix " * 40}
    first = ch.order(bs, doc)[0]
    other = next(b for b in bs if b is not first)
    first.inflight = BALANCE_ABS  # not more than BALANCE_ABS above the other: affinity holds
    assert ch.order(bs, doc)[0] is first
    first.inflight, other.inflight = BALANCE_ABS + 1, 0
    assert ch.order(bs, doc)[0] is other


def test_removing_an_instance_moves_only_its_own_prefixes():
    bs, ch = backends(5), Chooser("cache_aware")
    docs = [{"prompt": f"prefix {i} " + "y" * 300} for i in range(300)]
    before = [ch.order(bs, d)[0].name for d in docs]
    gone = bs.pop(2)
    after = [ch.order(bs, d)[0].name for d in docs]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert moved and all(b == gone.name for b, _ in moved)


def test_chat_messages_are_the_prefix():
    doc = {"messages": [{"role": "system", "content": "s" * 100}, {"role": "user", "content": "u" * 400}]}
    assert prefix_key(doc).startswith("s" * 100) and len(prefix_key(doc)) == PREFIX_CHARS


def test_round_robin_cycles_and_a_failed_instance_is_tried_last():
    bs, ch = backends(3), Chooser("round_robin")
    assert [ch.order(bs, {})[0].name for _ in range(6)] == ["i0", "i1", "i2", "i0", "i1", "i2"]
    bs[0].failed_until = time.monotonic() + 60
    orders = [ch.order(bs, {}) for _ in range(4)]
    assert all(o[0].name != "i0" and o[-1].name == "i0" and len(o) == 3 for o in orders)


def write_endpoints(run, instances, state="ready", key=True):
    doc = {"version": 1, "state": state, "instances": instances}
    if key:
        (run / "api_key").write_text("k1\n")
        (run / "api_key").chmod(0o600)
        doc["api_key_file"] = str(run / "api_key")
    tmp = run / "endpoints.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(run / "endpoints.json")


def test_the_pool_follows_states_drains_and_adapters(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    inst = [{"name": "a", "model": "m", "url": "http://h:1", "status": "ready", "lora_adapters": ["ad"]},
            {"name": "b", "model": "m", "url": "http://h:2", "status": "starting"}]
    write_endpoints(run, inst)
    pool = Pool([RunFollower(run)])
    assert [b.name for b in pool.by_name["m"]] == ["a"] and [b.name for b in pool.by_name["ad"]] == ["a"]
    assert pool.adapters == {"ad": "m"} and pool.followers[0].key == "k1"
    a = pool.by_name["m"][0]
    a.inflight = 3
    inst[1]["status"] = "ready"
    write_endpoints(run, inst)
    assert pool.poll() and sorted(b.name for b in pool.by_name["m"]) == ["a", "b"]
    assert next(b for b in pool.by_name["m"] if b.name == "a") is a  # the same record: in-flight count kept
    assert not pool.poll()  # nothing changed: nothing re-read
    write_drain(RunDir(run), ["a"])
    assert pool.poll() and [b.name for b in pool.by_name["m"]] == ["b"] and "ad" not in pool.by_name
    assert pool.known_models() == ["ad", "m"]  # still known: a 503, not a 404
    write_endpoints(run, inst, state="stopping")
    assert pool.poll() and pool.by_name == {}


def test_the_pool_follows_a_runs_file_and_runs_not_started_yet(tmp_path):
    runs_file = tmp_path / "runs.json"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_endpoints(a, [{"name": "x", "model": "m", "url": "http://h:1", "status": "ready"}])
    runs_file.write_text(json.dumps({"runs": [str(a), str(b)]}))  # b: queued, no endpoints file yet
    pool = Pool([], runs_file=runs_file)
    assert pool.poll() and [f.run.path for f in pool.followers] == [a, b]
    assert [bk.name for bk in pool.by_name["m"]] == ["x"]
    write_endpoints(b, [{"name": "y", "model": "m", "url": "http://h:2", "status": "ready"}])
    assert pool.poll() and sorted(bk.name for bk in pool.by_name["m"]) == ["x", "y"]
    runs_file.write_text(json.dumps({"runs": [str(b)]}) + " ")  # a handed over and left the list
    assert pool.poll() and [bk.name for bk in pool.by_name["m"]] == ["y"]


def test_bad_gateway_command_lines_are_one_line(tmp_path, capsys):
    from tests.core.helpers import run_cli

    run = tmp_path / "r"
    run.mkdir()
    write_endpoints(run, [{"name": "a", "model": "m", "url": "http://h:1", "status": "ready"}])
    for argv, words in ((["gateway"], "say which runs"),
                        (["gateway", "--runs-file", str(tmp_path / "runs.json")], "needs --key-file"),
                        (["endpoints", str(run), "--format", "url"], "has no gateway")):
        code, _, err = run_cli(capsys, *argv)
        assert code != 0 and words in err and "Traceback" not in err, (argv, err)
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
