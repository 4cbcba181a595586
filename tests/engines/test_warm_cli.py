"""`aegis warm` input handling: prefix file formats and the one-line errors (no server needed)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from aegis.engines.warm import read_prefixes, warm_cmd
from aegis.errors import AegisError, UsageError


def test_prefix_file_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["one", {"prefix": "two"}]))
    (tmp_path / "p2.json").write_text(json.dumps({"prefixes": ["three"]}))
    (tmp_path / "p.jsonl").write_text('"one"\n\n{"text": "two\\nlines"}\n')
    (tmp_path / "p.txt").write_text("first\nprefix\n---\n\nsecond\n---\n")
    assert read_prefixes(tmp_path / "p.json") == ["one", "two"]
    assert read_prefixes(tmp_path / "p2.json") == ["three"]
    assert read_prefixes(tmp_path / "p.jsonl") == ["one", "two\nlines"]
    assert read_prefixes(tmp_path / "p.txt") == ["first\nprefix", "second"]


@pytest.mark.parametrize("name,content,expected", [
    ("missing.txt", None, "missing.txt: prefix file not found"),
    ("dir", "DIR", "dir: is a directory, not a prefix file"),
    ("bad.json", "[1,", "bad.json: not valid JSON (line 1)"),
    ("bad.jsonl", '"ok"\n{nope\n', "bad.jsonl:2: not valid JSON"),
    ("num.json", "[1]", "num.json[0]: expected a string or an object with 'prefix'"),
    ("empty.txt", "\n---\n  \n", "empty.txt: the prefix file has no prefixes"),
    ("binary.txt", b"\xff\xfe\x00", "binary.txt: cannot read the prefix file"),
])
def test_unreadable_prefix_file_is_one_clear_line(tmp_path, name, content, expected):
    path = tmp_path / name
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    result = CliRunner().invoke(warm_cmd, ["--endpoints", str(tmp_path), "--prefixes", str(path)])
    assert isinstance(result.exception, UsageError)
    assert expected in str(result.exception) and "\n" not in str(result.exception)


def test_no_ready_instance_and_unknown_model(tmp_path):
    (tmp_path / "p.txt").write_text("shared system prompt")
    (tmp_path / "endpoints.json").write_text(json.dumps({"api_key_file": None, "instances": [
        {"name": "m-0", "model": "m", "url": "http://127.0.0.1:9", "status": "starting"}]}))
    args = ["--endpoints", str(tmp_path), "--prefixes", str(tmp_path / "p.txt")]
    result = CliRunner().invoke(warm_cmd, args)
    assert isinstance(result.exception, AegisError) and "no instance is ready to warm" in str(result.exception)
    result = CliRunner().invoke(warm_cmd, args + ["--model", "other"])
    assert "--model other: no instance in" in str(result.exception)
