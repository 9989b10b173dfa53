"""A TLS swarm: a lab CA from `tsotsa tls init`, a certificate per machine from `tsotsa tls issue`, mutual TLS
on every connection; clients and servers without the lab's certificates are refused with one readable line."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from transformers import LlamaForCausalLM

from conftest import cli, connect
from oracle import PROMPTS, assert_greedy_matches
from tsotsa.errors import SwarmError
from tsotsa.local_swarm import LocalSwarm
from tsotsa.tiny_model import make_tiny_model
from tsotsa.tls import TlsError, TlsSettings, init_ca, issue
from tsotsa.v1 import tsotsa_pb2 as pb
from tsotsa.v1 import tsotsa_pb2_grpc as pb_grpc

TOKEN = "s3cret-swarm-token"
LOOPBACK = ["--host", "127.0.0.1", "--host", "localhost"]


def run_cli(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run([*cli(name), *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.environ.get("PATH", ""), **(env or {})})


def settings(directory: Path, name: str) -> TlsSettings:
    return TlsSettings.load(directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """The lab's CA and the certificates of this machine (`machine`, for loopback) and of `far`, a machine
    named other.example, all made by the CLI as a lab would."""
    directory = tmp_path_factory.mktemp("lab") / "tls"
    for args in (("init", str(directory)), ("issue", str(directory), "machine", *LOOPBACK),
                 ("issue", str(directory), "far", "--host", "other.example")):
        made = run_cli("tsotsa", "tls", *args)
        assert made.returncode == 0, made.stderr
    return directory


@pytest.fixture(scope="module")
def other_lab(tmp_path_factory) -> Path:
    """Another lab's CA, with a certificate for this machine that it signed."""
    directory = tmp_path_factory.mktemp("other-lab")
    init_ca(directory)
    issue(directory, "machine", ["127.0.0.1", "localhost"])
    return directory


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tls-model") / "model", layers=2, hidden=64, heads=4, vocab=512,
                           seed=3)


@pytest.fixture(scope="module")
def swarm(two_blocks: Path, lab: Path, tmp_path_factory):
    """A coordinator and one peer, both with the lab's certificate for loopback and the swarm token."""
    with LocalSwarm(two_blocks, cache_dir=tmp_path_factory.mktemp("cache"), token=TOKEN,
                    tls=settings(lab, "machine")) as swarm:
        swarm.start_coordinator()
        swarm.add_peers(["0:2"])
        yield swarm


def tls_env(directory: Path, name: str = "machine") -> dict[str, str]:
    return {"TSOTSA_TLS_CERT": str(directory / f"{name}.crt"), "TSOTSA_TLS_KEY": str(directory / f"{name}.key"),
            "TSOTSA_TLS_CA": str(directory / "ca.crt")}


def test_greedy_generation_over_tls_equals_transformers(swarm, lab, two_blocks, tmp_path_factory) -> None:
    with connect(swarm, tmp_path_factory, token=TOKEN, tls=settings(lab, "machine")) as model:
        stats = assert_greedy_matches(model, LlamaForCausalLM.from_pretrained(two_blocks).eval(), PROMPTS,
                                      new_tokens=16)
    assert stats.hops == 1


def test_cli_with_the_lab_certificate_and_environment(swarm, lab, tmp_path) -> None:
    shown = run_cli("tsotsa", "status", "--coordinator", swarm.coordinator_address, "--json",
                    env={"TSOTSA_TOKEN": TOKEN, "TSOTSA_CACHE": str(tmp_path), **tls_env(lab)})
    assert shown.returncode == 0, shown.stderr
    assert '"online"' in shown.stdout


def test_the_token_still_counts_inside_tls(swarm, lab, tmp_path) -> None:
    refused = run_cli("tsotsa", "status", "--coordinator", swarm.coordinator_address,
                      env={"TSOTSA_CACHE": str(tmp_path), **tls_env(lab)})
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: coordinator at {swarm.coordinator_address}: UNAUTHENTICATED: "
                                      "missing or wrong swarm token")


def test_clients_without_the_lab_ca_are_refused_with_one_line(swarm, other_lab, tmp_path) -> None:
    address = swarm.coordinator_address
    plain = run_cli("tsotsa", "status", "--coordinator", address, env={"TSOTSA_TOKEN": TOKEN})
    assert plain.returncode == 1
    assert plain.stderr.strip() == (f"error: cannot reach coordinator at {address}: it closed the connection, as a "
                                    "TLS server does to a client without TLS (give --tls-cert, --tls-key and "
                                    "--tls-ca, or TSOTSA_TLS_*)")
    foreign = run_cli("tsotsa", "generate", "--coordinator", address, "hello",
                      env={"TSOTSA_TOKEN": TOKEN, "TSOTSA_CACHE": str(tmp_path), **tls_env(other_lab)}, timeout=120)
    assert foreign.returncode == 1
    assert foreign.stderr.strip() == (f"error: TLS certificate verification failed for coordinator at {address}: "
                                      "its certificate is not signed by the CA of --tls-ca")


def test_python_client_with_another_ca_is_refused(swarm, other_lab, tmp_path_factory) -> None:
    with pytest.raises(SwarmError, match=r"^TLS certificate verification failed for coordinator at .*: its "
                                         r"certificate is not signed by the CA of --tls-ca$"):
        connect(swarm, tmp_path_factory, token=TOKEN, tls=settings(other_lab, "machine"))


def test_servers_admit_only_certificates_the_lab_ca_signed(swarm, lab, other_lab) -> None:
    """Mutual TLS: the server, not only the client, checks the other side's certificate."""
    ca, mine, foreign = (lab / "ca.crt").read_bytes(), settings(lab, "machine"), settings(other_lab, "machine")
    for address in (swarm.coordinator_address, swarm.peers[0].address):
        outcomes = {}
        for name, credentials in (
                ("lab", grpc.ssl_channel_credentials(ca, mine.key, mine.cert)),
                ("none", grpc.ssl_channel_credentials(ca)),
                ("foreign", grpc.ssl_channel_credentials(ca, foreign.key, foreign.cert))):
            with grpc.secure_channel(address, credentials) as channel:
                try:
                    pb_grpc.PeerStub(channel).Info(pb.InfoRequest(), timeout=10,
                                                   metadata=[("authorization", f"Bearer {TOKEN}")])
                    outcomes[name] = "ok"
                except grpc.RpcError as error:
                    outcomes[name] = error.code().name
        # Info is the peer's; the coordinator admits the lab certificate and then has no such method.
        admitted = "ok" if address != swarm.coordinator_address else "UNIMPLEMENTED"
        assert outcomes == {"lab": admitted, "none": "UNAVAILABLE", "foreign": "UNAVAILABLE"}, address


def test_a_server_whose_certificate_is_for_another_host_is_refused(two_blocks, lab, tmp_path) -> None:
    """A coordinator listening on loopback with the certificate of other.example: clients refuse it."""
    with LocalSwarm(two_blocks, tls=settings(lab, "far")) as elsewhere:
        address = elsewhere.start_coordinator()
        refused = run_cli("tsotsa", "status", "--coordinator", address,
                          env={"TSOTSA_CACHE": str(tmp_path), **tls_env(lab)})
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: TLS certificate verification failed for coordinator at {address}: "
                                      f"its certificate is not for {address.rsplit(':', 1)[0]}")


def test_a_peer_refuses_to_serve_under_a_host_its_certificate_does_not_name(swarm, lab) -> None:
    refused = run_cli("tsotsa-peer", "join", "--coordinator", swarm.coordinator_address, "--wait-timeout", "1",
                      env={"TSOTSA_TOKEN": TOKEN, **tls_env(lab, "far")})
    assert refused.returncode == 1
    assert refused.stderr.strip() == (f"error: --tls-cert {lab / 'far.crt'} is for other.example, not for "
                                      "127.0.0.1, the address others reach this machine at; issue one with: "
                                      f"tsotsa tls issue DIR NAME --host 127.0.0.1")


def test_partial_tls_settings_are_one_line(swarm, lab) -> None:
    refused = run_cli("tsotsa", "status", "--coordinator", swarm.coordinator_address, "--tls-ca",
                      str(lab / "ca.crt"))
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("error: TLS needs all of --tls-cert, --tls-key and --tls-ca (or "
                                      "TSOTSA_TLS_CERT, TSOTSA_TLS_KEY, TSOTSA_TLS_CA); missing --tls-cert, --tls-key")


def test_inconsistent_tls_files_are_refused_when_loaded(lab, other_lab) -> None:
    """Caught once, at start-up, rather than as a handshake failure on some later connection."""
    with pytest.raises(TlsError, match=r"machine\.crt is not signed by the CA of --tls-ca .*ca\.crt"):
        TlsSettings.load(other_lab / "machine.crt", other_lab / "machine.key", lab / "ca.crt")
    with pytest.raises(TlsError, match=r"--tls-key .*far\.key is not the key of --tls-cert .*machine\.crt"):
        TlsSettings.load(lab / "machine.crt", lab / "far.key", lab / "ca.crt")
    with pytest.raises(TlsError, match=r"--tls-ca .*missing\.crt: cannot read it"):
        TlsSettings.load(lab / "machine.crt", lab / "machine.key", lab / "missing.crt")
    with pytest.raises(TlsError, match=r"--tls-cert .*machine\.key: not a PEM certificate"):
        TlsSettings.load(lab / "machine.key", lab / "machine.key", lab / "ca.crt")
    assert TlsSettings.load(None, None, None) is None


def test_tls_init_and_issue_refuse_to_overwrite(lab) -> None:
    before = {path.name: path.read_bytes() for path in lab.iterdir()}
    assert {name for name in before} == {"ca.key", "ca.crt", "machine.key", "machine.crt", "far.key", "far.crt"}
    assert all(stat.S_IMODE((lab / name).stat().st_mode) == 0o600 for name in ("ca.key", "machine.key", "far.key"))
    again = run_cli("tsotsa", "tls", "init", str(lab))
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {lab / 'ca.key'} already exists; refusing to overwrite it"
    again = run_cli("tsotsa", "tls", "issue", str(lab), "machine", "--host", "10.0.0.7")
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: {lab / 'machine.key'} already exists; refusing to overwrite it"
    assert {path.name: path.read_bytes() for path in lab.iterdir()} == before


def test_the_http_api_speaks_https_with_the_lab_certificate(swarm, lab, two_blocks) -> None:
    """`tsotsa serve` in a TLS swarm: HTTPS with the machine's certificate, the official client trusting the
    lab CA gets the same greedy text as transformers; a plain-HTTP request gets no answer."""
    import httpx2 as httpx  # the openai package's own HTTP client
    import openai
    import torch

    from tsotsa.local_swarm import HTTP_READY, ManagedProcess

    serve = ManagedProcess("serve", [*cli("tsotsa"), "serve", "--coordinator", swarm.coordinator_address,
                                     "--port", "0"], {"TSOTSA_TOKEN": TOKEN, **tls_env(lab)})
    try:
        url = serve.wait_for(HTTP_READY).group(1)
        assert url.startswith("https://")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60,
                               http_client=httpx.Client(verify=str(lab / "ca.crt")))
        name = client.models.list().data[0].id
        text = client.completions.create(model=name, prompt=[1, 5, 9, 33], max_tokens=6, temperature=0).choices[0].text
        reference = LlamaForCausalLM.from_pretrained(two_blocks).eval().generate(
            torch.tensor([[1, 5, 9, 33]]), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=6,
            do_sample=False)
        from transformers import AutoTokenizer

        assert text == AutoTokenizer.from_pretrained(two_blocks).decode(reference[0, 4:], skip_special_tokens=True)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/v1/models", timeout=10)
    finally:
        serve.terminate()
