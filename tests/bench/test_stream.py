"""The request path on hand-built HTTP responses from a raw socket server on loopback."""
import asyncio
import json

from aegis.bench.client import RequestOptions, send
from aegis.bench.http import Pool

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


END = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def comp(text, finish=None, usage=None):
    d = {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        d["usage"] = {"prompt_tokens": 5, "completion_tokens": usage, "total_tokens": 5 + usage}
    return event(d)


def usage_only(n):
    return event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}})


async def serve_script(script, opts=None, port_holder=None):
    """Serve `script` (bytes to write, floats to sleep, "close") to each request; return the client's result."""
    conns = []

    async def handle(reader, writer):
        conns.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                         .split(b":")[1])
            await reader.readexactly(length)
            for step in script:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif step == "close":
                    writer.transport.abort()
                    return
                else:
                    writer.write(step)
                    await writer.drain()
            if reader.at_eof():
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool()
    try:
        res = await send(pool, f"http://127.0.0.1:{port}", opts or RequestOptions(timeout=5), "m", "hi", 8, {})
        res["connections"] = len(conns)
        res["pool"], res["url"] = pool, f"http://127.0.0.1:{port}"
        if port_holder is not None:
            res2 = await send(pool, f"http://127.0.0.1:{port}", opts or RequestOptions(timeout=5), "m", "hi", 8, {})
            res["second"] = res2
            res["connections"] = len(conns)
        return res
    finally:
        pool.close()
        server.close()


def run(script, **kw):
    return asyncio.run(serve_script(script, **kw))


def test_multi_token_chunks_counted_from_continuous_usage():
    r = run([HEAD, chunk(comp(" a", usage=1)), 0.02, chunk(comp(" b c d", usage=4)), 0.02,
             chunk(comp(" e f", "length", usage=6)), chunk(usage_only(6)), END])
    assert r["success"], r["error"]
    assert r["chunk_tokens"] == [1, 3, 2]
    assert r["output_tokens"] == 6 and r["output_tokens_source"] == "usage"
    assert len(r["token_times"]) == 3 and r["continuous_usage"]
    assert r["token_times"][1] - r["token_times"][0] >= 0.015


def test_empty_first_chunk_is_not_the_first_token():
    r = run([HEAD, chunk(comp("")), 0.08, chunk(comp(" tok")), chunk(comp(" x", "length")), chunk(usage_only(2)), END])
    assert r["success"]
    ttft = r["token_times"][0] - r["t_send"]
    assert ttft >= 0.075
    assert r["chunk_tokens"] == [1, 1] and r["output_tokens"] == 2


def test_chat_role_chunk_is_not_the_first_token():
    role = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    tok = event({"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]})
    r = run([HEAD, chunk(role), 0.06, chunk(tok), END], opts=RequestOptions(api="chat", timeout=5))
    assert r["success"] and r["text"] == "Hi"
    assert r["token_times"][0] - r["t_send"] >= 0.055
    assert r["output_tokens"] == 1 and r["output_tokens_source"] == "chunks"


def test_usage_only_final_chunk_gives_the_count_but_no_token_time():
    r = run([HEAD, chunk(comp(" a")), chunk(comp(" b", "length")), 0.05, chunk(usage_only(2)), END])
    assert r["success"]
    assert len(r["token_times"]) == 2
    assert r["output_tokens"] == 2 and r["prompt_tokens"] == 5 and r["output_tokens_source"] == "usage"
    assert r["t_end"] - r["token_times"][-1] >= 0.045


def test_sse_split_at_odd_byte_boundaries_with_crlf_and_comments():
    body = b": ping\r\n\r\n" + comp(" a").replace(b"\n", b"\r\n") + comp(" b", "length") + usage_only(2) \
        + b"data: [DONE]\n\n"
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    r = run([HEAD] + [chunk(p) for p in pieces] + [b"0\r\n\r\n"])
    assert r["success"], r["error"]
    assert r["text"] == " a b" and r["output_tokens"] == 2


def test_large_single_event_is_not_limited_by_buffers():
    big = "x" * (3 << 20)
    r = run([HEAD, chunk(comp(big, "length", usage=1)), END])
    assert r["success"] and len(r["text"]) == 3 << 20


def test_http_500_is_an_error_of_its_kind():
    body = b'{"error": {"message": "boom"}}'
    r = run([b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % len(body) + body])
    assert not r["success"] and r["error_kind"] == "http_500" and "boom" in r["error"]
    assert r["http_status"] == 500


def test_disconnect_mid_stream():
    r = run([HEAD, chunk(comp(" a")), 0.02, "close"])
    assert not r["success"] and r["error_kind"] == "disconnect"
    assert len(r["token_times"]) == 1


def test_stream_without_done_or_finish_reason_is_a_disconnect():
    r = run([HEAD, chunk(comp(" a")), b"0\r\n\r\n"])
    assert not r["success"] and r["error_kind"] == "disconnect"


def test_timeout():
    r = run([HEAD, chunk(comp(" a")), 5.0], opts=RequestOptions(timeout=0.3))
    assert not r["success"] and r["error_kind"] == "timeout"
    assert 0.25 < r["t_end"] - r["t_send"] < 2.0


def test_error_object_inside_the_stream():
    r = run([HEAD, chunk(event({"error": {"message": "out of memory", "code": 500}})), END])
    assert not r["success"] and r["error_kind"] == "stream_error" and "out of memory" in r["error"]


def test_no_tokens_is_an_error():
    r = run([HEAD, chunk(usage_only(0)), END])
    assert not r["success"] and r["error_kind"] == "no_tokens"


def test_connection_refused_is_a_connect_error():
    async def go():
        pool = Pool()
        return await send(pool, "http://127.0.0.1:9", RequestOptions(timeout=2), "m", "p", 4, {})
    r = asyncio.run(go())
    assert not r["success"] and r["error_kind"] == "connect"


def test_non_streaming_answer_and_keep_alive_reuse():
    body = json.dumps({"model": "m", "choices": [{"text": "hello", "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 2, "completion_tokens": 3}}).encode()
    resp = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    r = run([resp], opts=RequestOptions(stream=False, timeout=5), port_holder=True)
    assert r["success"] and r["text"] == "hello" and r["output_tokens"] == 3
    assert r["second"]["success"]
    assert r["connections"] == 1          # the second request reused the connection
