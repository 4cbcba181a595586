"""The run's API key on the client side: where it comes from (flag, environment, the run's 0600 file) and its header."""
from __future__ import annotations

import os
import stat

from aegis.errors import UsageError


def read_key_file(path: str) -> str:
    """The first line of a key file; refuses files readable by others."""
    try:
        st = os.stat(path)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UsageError(f"API key file {path!r} is readable by others; run: chmod 600 {path}")
        with open(path) as fh:
            key = fh.readline().strip()
    except OSError as exc:
        raise UsageError(f"cannot read API key file {path!r}: {exc.strerror}") from None
    if not key:
        raise UsageError(f"API key file {path!r} is empty")
    return key


def resolve_api_key(key_file: str | None, run_key_file: str | None = None) -> str | None:
    """--api-key-file, then AEGIS_API_KEY, then the run's key file (endpoints.json names it), then OPENAI_API_KEY.

    The run's own key wins over OPENAI_API_KEY: a user's OpenAI key left in the shell would
    otherwise fail every request with 401 and travel in clear to the cluster's servers.
    """
    if key_file:
        return read_key_file(key_file)
    if os.environ.get("AEGIS_API_KEY"):
        return os.environ["AEGIS_API_KEY"].strip()
    if run_key_file:
        return read_key_file(run_key_file)
    if os.environ.get("OPENAI_API_KEY"):
        return os.environ["OPENAI_API_KEY"].strip()
    return None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The header that carries the key to an engine (none without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
