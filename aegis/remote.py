"""`--remote user@host[:port]`: run an aegis command on a login node over one SSH connection.

The first ssh call becomes a ControlMaster that persists for a few minutes,
so a one-time password or MFA prompt is answered once. Local files named on
the command line (the config, --site-file profiles) are uploaded over that
connection into a private temporary directory on the remote side. The remote
command is `aegis` (the site module) unless AEGIS_REMOTE_COMMAND says
otherwise; AEGIS_SSH_CONFIG names an ssh config file (-F) to use.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from aegis.errors import AegisError, UsageError


def split_remote(args: list[str]) -> tuple[str | None, list[str]]:
    """Take `--remote X` / `--remote=X` out of argv (before any `--`)."""
    out, target = [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        if arg == "--remote":
            if i + 1 >= len(args):
                raise UsageError("--remote needs a value: user@login-node[:port]")
            target = args[i + 1]
            i += 2
            continue
        if arg.startswith("--remote="):
            target = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return target, out


class Remote:
    def __init__(self, target: str):
        host, _, port = target.partition(":") if target.count(":") == 1 else (target, "", "")
        if not host or host.startswith("-"):
            raise UsageError(f"--remote {target!r}: expected user@login-node[:port]")
        self.host = host
        self.port = port
        control_dir = Path(os.environ.get("AEGIS_SSH_CONTROL_DIR",
                                          Path(tempfile.gettempdir()) / f"aegis-ssh-{os.getuid()}"))
        control_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(control_dir, 0o700)
        self.ssh = ["ssh", "-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/%C",
                    "-o", "ControlPersist=600"]
        if os.environ.get("AEGIS_SSH_CONFIG"):
            self.ssh += ["-F", os.environ["AEGIS_SSH_CONFIG"]]
        if port:
            self.ssh += ["-p", port]
        self.command = shlex.split(os.environ.get("AEGIS_REMOTE_COMMAND", "aegis"))

    def run(self, remote_argv: list[str], stdin: bytes | None = None, capture: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess:
        argv = self.ssh + [self.host, "--", shlex.join(remote_argv)]
        try:
            return subprocess.run(argv, input=stdin, capture_output=capture, timeout=timeout)
        except FileNotFoundError:
            raise AegisError("ssh not found: install an OpenSSH client") from None
        except subprocess.TimeoutExpired:
            raise AegisError(f"ssh to {self.host} did not answer within {timeout:.0f} s") from None

    def check(self, remote_argv: list[str], stdin: bytes | None = None) -> str:
        proc = self.run(remote_argv, stdin=stdin, timeout=120)
        if proc.returncode != 0:
            detail = " ".join(proc.stderr.decode(errors="replace").split())[-300:]
            raise AegisError(f"ssh {self.host} {remote_argv[0]} failed (exit {proc.returncode}): {detail}")
        return proc.stdout.decode()

    def upload(self, local: Path, remote_dir: str) -> str:
        dest = f"{remote_dir}/{local.name}"
        self.check(["sh", "-c", 'umask 077; cat > "$1"', "aegis-upload", dest], stdin=local.read_bytes())
        return dest


def run_remote(target: str, args: list[str]) -> int:
    """Run `aegis ARGS` on `target`, uploading local files first; returns the remote exit code."""
    remote = Remote(target)
    local_files = [i for i, a in enumerate(args) if not a.startswith("-") and os.path.isfile(a)]
    for i, a in enumerate(args):  # --site-file=PATH
        if a.startswith("--site-file=") and os.path.isfile(a.split("=", 1)[1]):
            local_files.append(i)
    args = list(args)
    tmp = None
    if local_files:
        tmp = remote.check(["mktemp", "-d", "-t", "aegis-remote.XXXXXX"]).strip()
        for i in local_files:
            prefix, path = ("--site-file=", args[i].split("=", 1)[1]) if args[i].startswith("--site-file=") \
                else ("", args[i])
            args[i] = prefix + remote.upload(Path(path), tmp)
    try:
        proc = remote.run(remote.command + args, capture=False)
    finally:
        if tmp:
            remote.run(["rm", "-rf", tmp], timeout=60)
    if proc.returncode == 255:
        print(f"aegis: error: ssh to {remote.host} failed (exit 255): check the host name, your "
              "credentials and AEGIS_SSH_CONFIG", file=sys.stderr)
    return proc.returncode
