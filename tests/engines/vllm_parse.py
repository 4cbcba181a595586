"""Parse vLLM command lines with the installed vLLM's own argument parsers; run by the vLLM venv's python.

    python vllm_parse.py REQUEST.json RESULT.json

REQUEST.json: {"cases": [{"id": ..., "argv": [program, ...]}, ...], "args_keys": [...], "engine_keys": [...]}
with each argv as the agent would exec it. RESULT.json: {"vllm": version, "api_server_warnings": [...],
"import_s": s, "parse_s": s, "results": {id: {"ok": bool, "entry": "api_server" | "serve", "stage": ...,
"error": str, "args": {...}, "engine": {...}, "deprecated": [...], "log": [...]}}}: `args` holds the parsed
namespace's values of args_keys, `engine` the AsyncEngineArgs values of engine_keys (JSON-able; dataclasses as dicts).

Each argv goes through what vLLM 0.32 itself runs before it builds an engine config (which needs the model's
HF config and a device, and is not done here):

- `PYTHON -m vllm.entrypoints.openai.api_server ARGS` runs vllm/entrypoints/launchers/api_server/entry.py
  `main()`: FlexibleArgumentParser + `make_arg_parser` (vllm/entrypoints/launchers/cli_args.py),
  `validate_parsed_serve_args`; then `run_server` -> `setup_server` calls `validate_api_server_args`
  (vllm/entrypoints/launchers/launcher.py) and `build_async_engine_client` calls
  `AsyncEngineArgs.from_cli_args` (vllm/engine/arg_utils.py).
- `DIR/vllm serve MODEL ARGS` runs vllm/entrypoints/cli/main.py `main()`: a top-level FlexibleArgumentParser
  whose `serve` subparser is `ServeSubcommand.subparser_init` (vllm/entrypoints/cli/serve.py, which calls
  `make_arg_parser`), then `ServeSubcommand.validate` (= `validate_parsed_serve_args`); of
  `ServeSubcommand.cmd` the argument handling before it starts anything is repeated here (model_tag ->
  model, --headless with --api-server-count), then `AsyncEngineArgs.from_cli_args`. Only the `serve`
  subcommand is registered (the other subcommands do not change how `serve ...` parses).

Standard library and vllm only: aegis is not installed in the vLLM venv.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import sys
import time
import warnings

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def plain(value):
    """A JSON-able copy of a parsed value (dataclasses and pydantic models as dicts, other objects as repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):
        return plain(value.model_dump())
    return repr(value)


def parse_error(stderr: str) -> str:
    """argparse's message without the usage block: from the last 'error:' on."""
    at = stderr.rfind(": error: ")
    return (stderr[at + 2:] if at >= 0 else stderr).strip()


def deprecated_used(parser, namespace) -> list[str]:
    """Options given on this command line that vLLM marks deprecated (FlexibleArgumentParser, argparse 3.13+)."""
    marked = set(getattr(parser, "_deprecated", ()))
    found = []
    for action in parser._actions:
        if (action in marked or getattr(action, "deprecated", False)) and action.option_strings \
                and getattr(namespace, action.dest, action.default) != action.default:
            found.append(action.option_strings[0])
    return found


class Records(logging.Handler):
    """Keeps vLLM's WARNING-and-above log lines of one parse."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def main() -> int:
    request_path, result_path = sys.argv[1:3]
    request = json.loads(open(request_path).read())
    t0 = time.monotonic()
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.launchers.launcher import validate_api_server_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if importlib.util.find_spec(API_SERVER_MODULE) is None:
        raise SystemExit(f"{API_SERVER_MODULE} is gone from vLLM {vllm.__version__}")
    with warnings.catch_warnings(record=True) as caught:  # what importing the module says (its -m start too)
        warnings.simplefilter("always")
        importlib.import_module(API_SERVER_MODULE)
    entry_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                      if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    import_s = time.monotonic() - t0

    def api_server_parser():
        """As entry.py main(): the api_server module's parser."""
        return make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-Compatible RESTful API server."))

    def cli_parsers():
        """As cli/main.py main(): `vllm` with the serve subcommand; (top-level parser, serve parser, command)."""
        top = FlexibleArgumentParser(description="vLLM CLI")
        subparsers = top.add_subparsers(required=False, dest="subparser")
        command = ServeSubcommand()
        sub = command.subparser_init(subparsers)
        sub.set_defaults(dispatch_function=command.cmd)
        return top, sub, command

    records = Records()
    logging.getLogger("vllm").addHandler(records)

    def check(argv: list[str]) -> dict:
        out: dict = {"ok": False, "stage": "parse", "error": "", "args": {}, "engine": {}, "deprecated": []}
        # Fresh parsers for every argv, as every process builds its own (defaults are not shared).
        if argv[1:3] == ["-m", API_SERVER_MODULE]:
            kind, args_in = "api_server", argv[3:]
            top = parser = api_server_parser()
        elif os.path.basename(argv[0]) == "vllm":
            kind, args_in = "serve", argv[1:]
            top, parser, serve = cli_parsers()
        else:
            out["error"] = f"not a vLLM entry point this check knows: {argv[:3]}"
            return out
        out["entry"] = kind
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
                args = top.parse_args(args_in)
                if kind == "serve":
                    if args.subparser != "serve":
                        raise ValueError(f"not the serve subcommand: {args.subparser!r}")
                out["deprecated"] = deprecated_used(parser, args)
                out["stage"] = "validate"
                if kind == "api_server":
                    validate_parsed_serve_args(args)
                    validate_api_server_args(args)
                else:
                    serve.validate(args)  # validate_parsed_serve_args
                    if args.model_tag is not None:  # ServeSubcommand.cmd, before it starts anything
                        args.model = args.model_tag
                    if args.headless and args.api_server_count is not None and args.api_server_count > 0:
                        raise ValueError(f"--api-server-count={args.api_server_count} cannot be used with "
                                         "--headless")
                out["args"] = {k: plain(getattr(args, k, "<missing>")) for k in request["args_keys"]}
                out["stage"] = "engine_args"
                engine = AsyncEngineArgs.from_cli_args(args)
                out["engine"] = {k: plain(getattr(engine, k, "<missing>")) for k in request["engine_keys"]}
        except SystemExit as exc:
            out["error"] = parse_error(stderr.getvalue()) or f"exit {exc.code}"
            return out
        except Exception as exc:  # vLLM's validation raises ValueError, TypeError, KeyError, ...
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out
        out["ok"], out["stage"] = True, "done"
        return out

    results = {}
    t1 = time.monotonic()
    for case in request["cases"]:
        del records.lines[:]
        results[case["id"]] = check(case["argv"])
        results[case["id"]]["log"] = list(records.lines)
    result = {"vllm": vllm.__version__, "api_server_warnings": entry_warnings, "import_s": round(import_s, 2),
              "parse_s": round(time.monotonic() - t1, 2), "results": results}
    with open(result_path, "w") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
