"""deploy/lab-install.sh, the Dockerfiles and deploy/compose.yaml, checked by running them where this machine can.

The install script runs for real into a temporary root (`--root`), with `--venv` pointing at an environment
that has tsotsa installed (building one with pip takes minutes); the unit it writes is checked by
`systemd-analyze verify`, and its ExecStart command line is run with the env file's settings, so a flag
the unit passes that `tsotsa-peer` does not take, or a variable the env file lacks, fails here. The compose
file's commands are parsed by the real typer apps, the way `tsotsa-peer` would parse them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "lab-install.sh"
TOKEN = "0123456789abcdef-swarm-token"


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """An environment with tsotsa in it, as `--venv` expects: a real venv of this interpreter whose site
    includes the test environment's packages, with the installed `tsotsa-peer` entry point. Its own copy, so
    that a script that wrongly removed it could not take the project's venv with it."""
    path = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = next((path / "lib").glob("python*/site-packages"))
    (site / "_tsotsa_test.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    entry = (Path(sys.executable).parent / "tsotsa-peer").read_text().split("\n", 1)[1]
    script = path / "bin" / "tsotsa-peer"
    script.write_text(f"#!{path / 'bin' / 'python'}\n{entry}")
    script.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    """A lab CA and this machine's certificate, made the way the lab makes them (tsotsa tls init/issue)."""
    from tsotsa.tls import init_ca, issue

    directory = tmp_path_factory.mktemp("tls")
    _, ca = init_ca(directory)
    key, cert = issue(directory, "peer-a", ["10.0.0.5"])
    return {"cert": cert, "key": key, "ca": ca}


def install(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TSOTSA_TOKEN": "", **(env or {})})


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def exec_start(unit: str) -> str:
    """The unit's ExecStart, its continuation lines joined, as systemd reads it."""
    match = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.M)
    return match.group(1).replace("\\\n", " ")


@pytest.fixture()
def installed(tmp_path, venv, tls_files):
    root = tmp_path / "root"
    root.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["--venv", str(venv), "--coordinator", "10.0.0.1:7070", "--announce-host", "10.0.0.5",
            "--token-file", str(token_file), "--quant", "nf4", "--extra-args", "--wait-timeout 1 --threads 1",
            "--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"]), "--tls-ca", str(tls_files["ca"])]
    result = install(root, *args)
    assert result.returncode == 0, result.stderr
    return root, args, result


def unit_and_env(root: Path) -> tuple[Path, Path]:
    return root / "etc/systemd/system/tsotsa-peer.service", root / "etc/tsotsa/peer.env"


def test_install_writes_the_unit_and_a_private_env_file(installed, venv, tls_files) -> None:
    root, _, result = installed
    unit, env = unit_and_env(root)
    assert env.stat().st_mode & 0o777 == 0o600  # it holds the token
    assert unit.stat().st_mode & 0o777 == 0o644
    text = unit.read_text()
    assert f"exec {venv}/bin/tsotsa-peer join" in exec_start(text)
    assert re.search(rf"^EnvironmentFile={re.escape(str(env))}$", text, re.M)
    assert TOKEN not in text
    values = read_env(env)
    assert values["TSOTSA_COORDINATOR"] == "10.0.0.1:7070" and values["TSOTSA_ANNOUNCE_HOST"] == "10.0.0.5"
    assert values["TSOTSA_TOKEN"] == TOKEN and values["TSOTSA_QUANT"] == "nf4"
    assert values["TSOTSA_TLS_CERT"] == str(tls_files["cert"]) and values["TSOTSA_TLS_CA"] == str(tls_files["ca"])
    assert values["TSOTSA_HOST"] == "0.0.0.0" and values["TSOTSA_DEVICE"] == "cpu"  # defaults of a first install
    assert "systemctl not called" in result.stdout
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stderr


def test_the_units_command_line_starts_the_peer_with_the_env_files_settings(installed) -> None:
    """ExecStart run as systemd would run it (after its `$$` → `$`), with the env file's variables: the real
    peer parses every flag, loads the TLS files, and stops only at the coordinator, which is not there."""
    root, _, _ = installed
    unit, env = unit_and_env(root)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{probe.getsockname()[1]}"
    values = {**read_env(env), "TSOTSA_COORDINATOR": closed}
    argv = exec_start(unit.read_text()).replace("$$", "$")
    assert argv.startswith("/bin/sh -c '") and argv.endswith("'")
    result = subprocess.run(["/bin/sh", "-c", argv[len("/bin/sh -c '"):-1]], capture_output=True, text=True,
                            timeout=120, env={"PATH": os.environ["PATH"], "HOME": str(root), **values})
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot reach coordinator at {closed} (is it running?)"


def test_a_second_run_changes_nothing_and_edits_survive(installed) -> None:
    root, args, _ = installed
    files = unit_and_env(root)
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in files]
    again = install(root, *args)
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in files] == before

    unit, env = files
    edited = env.read_text().replace("TSOTSA_PORT=7080", "TSOTSA_PORT=7099") + "# moved to port 7099 for the firewall\n"
    env.write_text(edited)
    assert install(root, *args).returncode == 0  # the flags do not name the port: the edit is kept
    assert env.read_text() == edited
    changed = install(root, *args, "--quant", "int8", "--dtype", "bfloat16")
    assert changed.returncode == 0 and "env file" in changed.stdout and "updated" in changed.stdout
    assert env.read_text() == edited.replace("TSOTSA_QUANT=nf4", "TSOTSA_QUANT=int8").replace(
        "TSOTSA_DTYPE=float32", "TSOTSA_DTYPE=bfloat16")
    assert env.stat().st_mode & 0o777 == 0o600
    assert unit.read_bytes() == before[0][0]


def test_uninstall_removes_what_it_installed_and_nothing_else(installed, venv) -> None:
    root, _, _ = installed
    unit, env = unit_and_env(root)
    neighbour_env = env.parent / "coordinator.env"  # the admin's, beside ours
    neighbour_env.write_text("TSOTSA_MODEL=/srv/models/x\n")
    neighbour_unit = unit.parent / "other.service"
    neighbour_unit.write_text("[Service]\nExecStart=/bin/true\n")
    result = install(root, "--uninstall")
    assert result.returncode == 0, result.stderr
    assert not unit.exists() and not env.exists()
    assert neighbour_env.read_text() == "TSOTSA_MODEL=/srv/models/x\n" and neighbour_unit.exists()
    assert (venv / "bin" / "tsotsa-peer").exists()  # reused with --venv: not ours to remove
    assert "nothing to remove" in install(root, "--uninstall").stdout
    neighbour_env.unlink()
    neighbour_unit.unlink()
    assert install(root, "--uninstall").returncode == 0  # under --root, the directories it made go too
    assert list(root.iterdir()) == []


def test_a_file_it_did_not_write_is_neither_overwritten_nor_removed(tmp_path, venv) -> None:
    root = tmp_path / "root"
    env = root / "etc/tsotsa/peer.env"
    env.parent.mkdir(parents=True)
    env.write_text("TSOTSA_COORDINATOR=192.168.1.10:7070\n")  # made by hand from deploy/peer.env
    result = install(root, "--venv", str(venv), "--coordinator", "10.0.0.1:7070", "--announce-host", "10.0.0.5")
    assert result.returncode == 1 and "did not write it" in result.stderr
    assert "kept" in install(root, "--uninstall").stdout
    assert env.read_text() == "TSOTSA_COORDINATOR=192.168.1.10:7070\n"


@pytest.mark.parametrize("args, message", [
    ([], "no --coordinator HOST:PORT given"),
    (["--coordinator", "10.0.0.1:7070"], "no --announce-host given"),
    (["--coordinator", "10.0.0.1"], "expected HOST:PORT"),
    (["--coordinator", "10.0.0.1:7070", "--announce-host", "a", "--quant", "fp4"], "--quant fp4"),
    (["--coordinator", "10.0.0.1:7070", "--announce-host", "a", "--tls-cert", str(SCRIPT)], "all three"),
    (["--coordinator", "10.0.0.1:7070", "--announce-host", "a", "--token", "with space"], "whitespace"),
    (["--coordinator", "10.0.0.1:7070", "--announce-host", "a", "--extra-args", "--x '1'"], "quotes"),
    (["--coordinator"], "--coordinator needs a value"),
    (["--coordinatr", "x"], "unknown option --coordinatr"),
])
def test_bad_or_missing_arguments_fail_with_one_line_and_write_nothing(tmp_path, venv, args, message) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = install(root, "--venv", str(venv), *args)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("lab-install.sh: error: ")
    assert message in result.stderr
    assert list(root.iterdir()) == []


def test_script_is_strict_bash() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in SCRIPT.read_text()


# ------------------------------------------------------------------------------------ Docker and compose

COMPOSE = REPO / "deploy" / "compose.yaml"
APPS = {"tsotsa": "tsotsa.cli", "tsotsa-peer": "tsotsa.peer.cli", "tsotsa-coordinator": "tsotsa.coordinator.cli"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, enough for this file."""
    def value(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"compose would stop: {arg}")
        return arg or ""
    return re.sub(r"\$\{([A-Z_]+)(?:(:-|:\?)([^}]*))?\}", value, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), {"TSOTSA_TOKEN": TOKEN}))


def parse_with_cli(argv: list[str]) -> dict:
    """Parses `argv` with the real typer app of its console script, converting every value and checking
    required options, without running the command: what the container's process would accept."""
    import importlib

    import click

    group = typer.main.get_command(importlib.import_module(APPS[argv[0]]).app)
    parent = click.Context(group, info_name=argv[0])
    command = group.get_command(parent, argv[1])
    assert command is not None, f"{argv[0]} has no command {argv[1]!r}"
    return command.make_context(argv[1], list(argv[2:]), parent=parent).params


def test_compose_runs_a_coordinator_and_two_peers_with_real_commands(compose) -> None:
    services = compose["services"]
    assert {"coordinator", "peer-1", "peer-2"} <= set(services)
    coordinator = parse_with_cli(services["coordinator"]["command"])
    assert coordinator["host"] == "0.0.0.0" and str(coordinator["model"]).startswith("/models/")
    for name in ("peer-1", "peer-2"):
        peer = parse_with_cli(services[name]["command"])
        assert peer["coordinator"] == f"coordinator:{coordinator['port']}"
        assert peer["announce_host"] == name and peer["host"] == "0.0.0.0"
        assert any(volume.endswith(":/state") for volume in services[name]["volumes"])
    for name, service in services.items():
        assert service["environment"]["TSOTSA_TOKEN"] == TOKEN, name
        assert (REPO / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        parse_with_cli(service["command"])
    volumes = services["coordinator"]["volumes"]
    assert any(v.endswith(":/models:ro") for v in volumes) and any(v.endswith(":/state") for v in volumes)
    assert set(compose["volumes"]) >= {v.split(":")[0] for s in services.values() for v in s["volumes"]
                                       if not v.startswith((".", "/"))}


def test_compose_needs_the_token() -> None:
    with pytest.raises(AssertionError, match="set TSOTSA_TOKEN"):
        interpolate(COMPOSE.read_text(), {})


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose on this machine")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                            text=True, env={**os.environ, "TSOTSA_TOKEN": TOKEN}, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_install_the_pinned_torch_and_copy_files_that_exist(name) -> None:
    text = (REPO / "deploy" / name).read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}"
    assert re.search(r'pip install .*-c constraints\.txt "torch==2\.13\.0"', text)
    assert re.search(r"pip install -c constraints\.txt \.", text)
    first = next(line for line in lines if line.startswith("FROM"))
    if name == "Dockerfile.cuda":
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\w.-]+-runtime-", text, re.M) and first == "FROM ${CUDA_IMAGE}"
        assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", text, re.M)
    else:
        assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    constraints = (REPO / "constraints.txt").read_text()
    assert "torch==2.13.0" in constraints.splitlines()  # the pin the images install matches the lock
