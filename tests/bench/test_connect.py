"""Connecting has a bound of its own: a server whose listen backlog is full never accepts, and fails in time."""
import json
import select
import socket
import time

import pytest

from aegis.bench.http import HTTPError, Pool
from tests.bench.conftest import aegis, records


@pytest.fixture
def unaccepting():
    """http://127.0.0.1:PORT of a socket that listens with a full backlog and never accepts: the kernel drops
    further SYNs, so a connect hangs (as to a server that is down behind a firewall) instead of being refused."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    held = []
    for _ in range(8):      # fill the accept queue until a connect stays pending
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        held.append(c)
        if not select.select([], [c], [], 0.3)[1]:
            break
    else:
        pytest.fail("could not fill the listen backlog")
    yield f"http://127.0.0.1:{port}"
    for c in held:
        c.close()
    srv.close()


def test_a_connect_to_a_full_backlog_times_out_in_its_bound(unaccepting):
    import asyncio

    async def go():
        pool = Pool(connect_timeout=0.5)
        t = time.monotonic()
        with pytest.raises(HTTPError) as err:
            await pool._connect(("http", "127.0.0.1", int(unaccepting.rsplit(":", 1)[1])))
        return time.monotonic() - t, err.value.kind
    took, kind = asyncio.run(go())
    assert kind == "connect_timeout" and 0.5 <= took < 1.5


def test_bench_counts_connect_timeouts_and_finishes_in_time(unaccepting, tmp_path):
    out = tmp_path / "run"
    t = time.monotonic()
    aegis("bench", "--url", unaccepting, "--model", "m", "--no-tokenize", "--no-scrape", "--rate", "20",
          "--num-requests", "3", "--input-len", "8", "--output-len", "2", "--connect-timeout", "1",
          "--no-progress", "--output-dir", str(out))
    took = time.monotonic() - t
    # warming the pool (1 s) + the requests (1 s each, in parallel) + the interpreter's start
    assert took < 8, took
    recs = records(out)
    assert [r["error_kind"] for r in recs] == ["connect_timeout"] * 3
    assert all(0.9e3 <= r["e2el_ms"] < 3e3 for r in recs)
    assert json.loads((out / "summary.json").read_text())["errors_by_kind"] == {"connect_timeout": 3}


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bad_connect_timeout_is_one_line(value):
    p = aegis("bench", "--url", "http://127.0.0.1:9", "--model", "m", "--rate", "1", "--num-requests", "1",
              "--connect-timeout", value, check=False)
    assert p.returncode == 2 and "--connect-timeout" in p.stderr and len(p.stderr.strip().splitlines()) == 1
