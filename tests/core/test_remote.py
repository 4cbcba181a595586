"""`--remote`: a real OpenSSH server on loopback (own port, a key made for the test)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aegis.errors import UsageError
from aegis.remote import split_remote

SSHD = "/usr/sbin/sshd"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    assert os.path.exists(SSHD), "tests/run.sh installs the Debian package openssh-server"
    d = tmp_path_factory.mktemp("sshd")
    os.chmod(d, 0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nMaxSessions 50\n"
        f"SetEnv AEGIS_VIA_SSH=1\n")
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    (d / "ssh_config").write_text(
        f"Host login-test\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d / 'user_key'}\n"
        "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        "  BatchMode yes\n")
    yield d
    subprocess.run(["ssh", "-F", str(d / "ssh_config"), "-o", f"ControlPath={d / 'ctl'}/%C", "-O", "exit",
                    "login-test"], capture_output=True)
    proc.terminate()
    proc.wait(10)


def aegis(sshd, *args, cwd):
    env = {**os.environ, "AEGIS_SSH_CONFIG": str(sshd / "ssh_config"),
           "AEGIS_SSH_CONTROL_DIR": str(sshd / "ctl"),
           # the "login node" is this machine: its aegis is this Python's
           "AEGIS_REMOTE_COMMAND": f"env -C {cwd} {sys.executable} -m aegis"}
    return subprocess.run([sys.executable, "-m", "aegis", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_split_remote():
    assert split_remote(["submit", "c.yaml", "--remote", "u@h", "--", "--remote", "x"]) == (
        "u@h", ["submit", "c.yaml", "--", "--remote", "x"])
    assert split_remote(["--remote=u@h:2222", "status"]) == ("u@h:2222", ["status"])
    with pytest.raises(UsageError):
        split_remote(["status", "--remote"])


@pytest.mark.slow
def test_remote_submit_status_over_one_connection(sshd, tmp_path):
    local = tmp_path / "laptop"
    local.mkdir()
    cfg = local / "config.yaml"
    cfg.write_text("site: local\nmodel: m\nname: remote-test\n")
    remote_home = tmp_path / "login"
    remote_home.mkdir()
    proc = aegis(sshd, "submit", cfg, "--check", "--wait", "--timeout", "60", "--json", "--remote", "login-test",
                 cwd=local)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.splitlines()[0])
    run_dir = Path(info["run_dir"])
    assert run_dir.is_relative_to(local) and (run_dir / "nodes" / "0.json").exists()
    # The config travelled over ssh into a private directory on the login node.
    uploaded = run_dir / "config.yaml"
    assert "remote-test" in uploaded.read_text()
    # A master connection is running: later commands reuse it (no second login).
    check = subprocess.run(["ssh", "-F", str(sshd / "ssh_config"), "-o", f"ControlPath={sshd / 'ctl'}/%C",
                            "-O", "check", "login-test"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = aegis(sshd, "--remote", "login-test", "status", run_dir, "--json", cwd=local)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "completed"
    # Remote errors keep their exit code and message.
    proc = aegis(sshd, "--remote", "login-test", "plan", "--model", "m", "--instances", "0", cwd=local)
    assert proc.returncode == 2 and "--instances:" in proc.stderr


@pytest.mark.slow
def test_unreachable_remote_is_one_clear_line(sshd, tmp_path):
    proc = aegis(sshd, "--remote", "nobody@127.0.0.1:1", "status", cwd=tmp_path)
    assert proc.returncode == 255
    assert "ssh to nobody@127.0.0.1 failed" in proc.stderr
