"""Workloads: exact prompt lengths against a server tokenizer, shared prefixes, ShareGPT, LoRA mixes."""
import asyncio
import json
from collections import Counter

import aiohttp
import pytest

from aegis.bench import workload
from aegis.bench.workload import ServerTokenizer, WorkloadSpec
from aegis.errors import UsageError


async def _build(url, spec, n, tokenize=True):
    async with aiohttp.ClientSession() as s:
        tok = ServerTokenizer(s, url, None, {}) if tokenize else None
        if tok is not None:
            assert await tok.probe()
        reqs = await workload.build(spec, n, tok)
        counts = [len(await ServerTokenizer(s, url, None, {}).tokenize(r.prompt)) for r in reqs]
        return reqs, counts


def build(url, spec, n, tokenize=True):
    return asyncio.run(_build(url, spec, n, tokenize))


def test_random_prompts_have_exact_token_lengths(sim):
    spec = WorkloadSpec(kind="random", input_len=100, output_len=7, range_ratio=0.5, seed=3)
    reqs, counts = build(sim.url, spec, 20)
    assert counts == [r.prompt_len for r in reqs]
    assert all(r.exact for r in reqs)
    assert all(50 <= r.prompt_len <= 150 for r in reqs) and len({r.prompt_len for r in reqs}) > 5
    assert all(3 <= r.output_len <= 10 for r in reqs)
    again, _ = build(sim.url, spec, 20)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    other, _ = build(sim.url, WorkloadSpec(kind="random", input_len=100, seed=4), 20)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]


def test_without_a_tokenizer_lengths_are_marked_inexact(sim):
    reqs, counts = build(sim.url, WorkloadSpec(kind="random", input_len=40), 3, tokenize=False)
    assert not any(r.exact for r in reqs)


def test_shared_prefix_groups(sim):
    spec = WorkloadSpec(kind="shared-prefix", num_groups=3, prompts_per_group=4, prefix_len=64, suffix_len=16)
    reqs, counts = build(sim.url, spec, 12)
    assert counts == [80] * 12
    by_group = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r.prompt)
    assert sorted(by_group) == [0, 1, 2] and all(len(v) == 4 for v in by_group.values())
    for prompts in by_group.values():
        common = prompts[0]
        for p in prompts[1:]:
            while not p.startswith(common):
                common = common[:-1]
        assert len(common) >= 64 * 2          # at least the prefix is shared
        assert len(set(prompts)) == 4
    firsts = [by_group[g][0][:50] for g in by_group]
    assert len(set(firsts)) == 3              # groups differ


def test_sharegpt_file(sim, tmp_path):
    data = [{"conversations": [{"from": "human", "value": "tell me about cats please"},
                               {"from": "gpt", "value": "cats are small furry animals that purr"}]},
            {"conversations": [{"from": "system", "value": "x"}]},
            {"conversation": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}]
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(data))
    reqs, counts = build(sim.url, WorkloadSpec(kind="sharegpt", dataset=str(f), output_len=None), 4)
    prompts = {r.prompt for r in reqs}
    assert prompts == {"tell me about cats please", "hi there"}
    cats = next(r for r in reqs if r.prompt.startswith("tell"))
    assert cats.output_len == len(asyncio.run(_count(sim.url, "cats are small furry animals that purr")))
    assert [r.prompt_len for r in reqs] == counts


async def _count(url, text):
    async with aiohttp.ClientSession() as s:
        return await ServerTokenizer(s, url, None, {}).tokenize(text)


def test_sharegpt_errors(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('{"not": "a list"}')
    with pytest.raises(UsageError, match="JSON list"):
        workload.load_sharegpt(str(f))


def test_lora_mixes():
    rr = workload.assign_adapters(WorkloadSpec(lora=["a", "b", "c"], lora_mix="round-robin"), 7)
    assert rr == ["a", "b", "c", "a", "b", "c", "a"]
    z = Counter(workload.assign_adapters(WorkloadSpec(lora=["a", "b", "c", "d"], lora_mix="zipf", zipf_s=1.2), 4000))
    assert z["a"] > z["b"] > z["c"] > z["d"] > 0
    assert z["a"] / z["b"] == pytest.approx(2 ** 1.2, rel=0.15)
    u = Counter(workload.assign_adapters(WorkloadSpec(lora=["a", "b"], lora_mix="uniform", seed=1), 4000))
    assert abs(u["a"] - u["b"]) < 300
    assert workload.assign_adapters(WorkloadSpec(lora=["a", "b"], seed=1), 50) == \
        workload.assign_adapters(WorkloadSpec(lora=["a", "b"], seed=1), 50)
    assert workload.assign_adapters(WorkloadSpec(), 3) == [None, None, None]
