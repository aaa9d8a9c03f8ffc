"""Sites on their own machines, on loopback: the aggregator and two sites share nothing but the
network.

The aggregator's folder holds its scenario, its keys, the TLS CA and the SuperLink's state;
each site's folder holds its data, its site config, its passphrase-protected site key, its
SuperNode key and its copy of the backbone. Each SuperNode runs in a mount namespace of its own
in which the aggregator's folder and the other site's are empty (a tmpfs over each), without
the capability to unmount them, so it cannot read them. (Another user would not do here: the
virtual environment's Python lives under root's home, which only root may enter.) What
travels between them is what docs/deployment.md says: the sites' public keys to the aggregator,
the CA certificate and the aggregator's public key to the sites.

The SuperLink listens on loopback only (Control API, Fleet API and the ServerApp's runtime API
share its one address); the sites reach the Fleet API through a reverse proxy (nginx) that
passes ``/v1/fleet/`` and nothing else, as on the aggregator's machine the public address
would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import loopback
import pytest
from conftest import qa_records
from loopback import free_port, stop

ROOT = loopback.ROOT
SITES = ("site0", "site1")
PASSPHRASES = {"site0": "correct horse 0", "site1": "battery staple 1"}

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("setpriv")
                                                 and shutil.which("unshare")),
                       reason="hides folders from the SuperNodes in mount namespaces: needs "
                       "root, unshare and setpriv"),
    pytest.mark.skipif(shutil.which("nginx") is None,
                       reason="the Fleet API is proxied by nginx: apt-get install nginx-light"),
]

NGINX = """worker_processes 1;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log {dir}/nginx-access.log;
  client_body_temp_path {dir}/nginx-tmp/body;
  proxy_temp_path {dir}/nginx-tmp/proxy;
  fastcgi_temp_path {dir}/nginx-tmp/fastcgi;
  uwsgi_temp_path {dir}/nginx-tmp/uwsgi;
  scgi_temp_path {dir}/nginx-tmp/scgi;
  server {{
    listen 127.0.0.1:{fleet_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location /v1/fleet/ {{
      proxy_pass https://127.0.0.1:{link_port};
      proxy_http_version 1.1;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 3600s;
    }}
    location / {{ return 403; }}
  }}
}}
"""


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    env = loopback.flower_env(home, HOME=str(home), HF_HOME=str(home / "hf"),
                              TMPDIR=str(home / "tmp"), **extra)
    (home / "tmp").mkdir(exist_ok=True)
    return env


@dataclass
class Federation:
    aggregator: Path
    sites: dict[str, Path]
    admin_env: dict[str, str]
    """The aggregator operator's Flower configuration: the SuperLink's loopback address."""
    site_env: dict[str, str]
    """A site-style Flower configuration: the CA certificate, the Fleet API's address."""
    link_port: int
    fleet_port: int
    logs: list[Path] = field(default_factory=list)

    def submit(self, scenario: Path, out: Path) -> subprocess.CompletedProcess[str]:
        cmd = ["flwr", "run", str(ROOT), "admin", "--stream", "--run-config",
               f'scenario="{scenario}" out="{out}"']
        try:
            return subprocess.run(cmd, env=self.admin_env, cwd=self.aggregator,
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            said = subprocess.CompletedProcess(cmd, 124, str(exc.stdout), str(exc.stderr))
            pytest.fail(f"the run took over 300 s:\n{self.detail(said)}")

    def detail(self, run: subprocess.CompletedProcess[str]) -> str:
        return run.stdout[-3000:] + run.stderr[-3000:] + "".join(
            f"\n--- {log.name}\n{log.read_text(errors='replace')[-2500:]}" for log in self.logs)

    def runs(self) -> list[dict[str, object]]:
        ls = subprocess.run(["flwr", "ls", "admin", "--format", "json"], env=self.admin_env,
                            cwd=self.aggregator, capture_output=True, text=True, timeout=60)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        runs: list[dict[str, object]] = json.loads(ls.stdout)["runs"]
        return runs


def hidden(folders: list[Path], cmd: list[str]) -> list[str]:
    """``cmd`` in a mount namespace of its own where each of ``folders`` is an empty tmpfs,
    without CAP_SYS_ADMIN (it cannot unmount them)."""
    mounts = " && ".join(f'mount -t tmpfs -o size=64k,mode=0 tmpfs "${i + 1}"'
                         for i in range(len(folders)))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'{mounts} && shift {len(folders)} && exec setpriv --bounding-set=-sys_admin -- "$@"',
            "sh", *map(str, folders), *cmd]


def aggregator_scenario(folder: Path, backbone: Path, rounds: int, lora_r: int = 8) -> Path:
    path = folder / f"scenario-r{lora_r}.toml"
    path.write_text(f'[backbone]\nname = "{backbone}"\n'
                    f"[lora]\nr = {lora_r}\n"
                    "[train]\nmax_steps = 2\nwarmup_steps = 1\nbatch_size = 4\n"
                    "[evaluation]\nquestions = 0\n"
                    f'[federation]\nrounds = {rounds}\nsites = ["site0", "site1"]\n'
                    f'[security]\nkeys = "{folder / "keys"}"\n')
    return path


@pytest.fixture(scope="module")
def federation(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Federation]:
    from fed_llama.crypto.keyring import KeyFolder
    from fed_llama.crypto.transport import init_node, init_tls

    top = Path(tempfile.mkdtemp(prefix="fed-llama-share-nothing-"))
    top.chmod(0o711)  # each party can reach its own folder, list none
    agg = top / "aggregator"
    agg.mkdir(mode=0o700)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # the aggregator: its backbone copy, its update keys, the TLS CA and certificate
        shutil.copytree(tiny_backbone, agg / "backbone")
        KeyFolder(agg / "keys").init_server("x25519")
        tls = init_tls(agg / "keys")
        sites: dict[str, Path] = {}
        for i, site in enumerate(SITES):  # each site makes its own keys and keeps its data
            home = top / site
            home.mkdir(mode=0o700)
            (home / "data").mkdir()
            (home / "data" / "train.jsonl").write_text("".join(
                json.dumps(r) + "\n" for r in qa_records(16 + 4 * i)))
            shutil.copytree(tiny_backbone, home / "backbone")
            KeyFolder(home / "keys").init_site(site, PASSPHRASES[site].encode())
            init_node(home / "keys", site)
            # what travels: the site's public keys to the aggregator ...
            KeyFolder(agg / "keys").enroll(home / "keys" / "sites" / f"{site}.pub.json")
            shutil.copy(home / "keys" / "nodes" / f"{site}.pub", agg / f"{site}-node.pub")
            # ... the CA certificate and the aggregator's public key to the site
            shutil.copy(tls.ca_cert, home / "ca.crt")
            shutil.copy(agg / "keys" / "server.pub.json", home / "server.pub.json")
            (home / "site.toml").write_text(
                f'name = "{site}"\nsource = "data/train.jsonl"\n'
                f'site_key = "keys/sites/{site}.key"\nserver_public = "server.pub.json"\n'
                f'passphrase_env = "{site.upper()}_PASSPHRASE"\n'
                'backbone = "backbone"\nbackbone_cache = "cache"\n')
            sites[site] = home
        link_port, fleet_port = free_port(), free_port()
        admin_env = flower_env(agg)
        (agg / "flwr-home").mkdir()
        (agg / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "admin"\n\n[superlink.admin]\n'
            f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{tls.ca_cert}"\n')
        probe = top / "probe"  # a site-style Flower configuration: the CA and the Fleet API
        probe.mkdir()
        shutil.copy(tls.ca_cert, probe / "ca.crt")
        site_env = flower_env(probe)
        (probe / "flwr-home").mkdir()
        (probe / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
            f'address = "127.0.0.1:{fleet_port}"\nroot-certificates = "{probe / "ca.crt"}"\n')
        fed = Federation(agg, sites, admin_env, site_env, link_port, fleet_port)

        def start(name: str, cmd: list[str], env: dict[str, str], cwd: Path,
                  hide: list[Path] | None = None) -> subprocess.Popen[bytes]:
            log = top / f"{name}.log"
            fed.logs.append(log)
            if hide:
                cmd = hidden(hide, cmd)
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log.open("wb"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            return proc

        start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(tls.ca_cert),
                            "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
                            "--enable-supernode-auth",
                            "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(link_port),
                            "--database", str(agg / "state.db")], admin_env, agg)
        (top / "nginx-tmp").mkdir(mode=0o777)  # nginx workers run as nobody
        (top / "nginx-tmp").chmod(0o777)
        (top / "nginx.conf").write_text(NGINX.format(
            dir=top, fleet_port=fleet_port, link_port=link_port, cert=tls.cert, key=tls.key,
            ca=tls.ca_cert))
        start("nginx", ["nginx", "-c", str(top / "nginx.conf"), "-p", str(top), "-g",
                        "daemon off;"], admin_env, top)
        deadline = time.monotonic() + 60
        while True:  # the SuperLink answers its operator on loopback
            ls = subprocess.run(["flwr", "ls", "admin"], env=admin_env, cwd=agg,
                                capture_output=True, text=True, timeout=60)
            if ls.returncode == 0:
                break
            assert time.monotonic() < deadline, fed.detail(
                subprocess.CompletedProcess([], 1, ls.stdout, ls.stderr))
            time.sleep(1)
        for site in SITES:  # the operator registers the node keys the sites sent
            reg = subprocess.run(["flwr", "supernode", "register", str(agg / f"{site}-node.pub"),
                                  "admin"], env=admin_env, cwd=agg, capture_output=True,
                                 text=True, timeout=60)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for site, home in sites.items():
            env = flower_env(home, **{f"{site.upper()}_PASSPHRASE": PASSPHRASES[site]})
            start(f"supernode-{site}", [
                "flower-supernode", "--root-certificates", str(home / "ca.crt"),
                "--superlink", f"127.0.0.1:{fleet_port}",
                "--auth-supernode-private-key", str(home / "keys" / "nodes" / f"{site}.key"),
                "--port", str(free_port()),
                "--node-config", f"site-config='{home / 'site.toml'}'"],
                env, home, hide=[agg, *(h for h in sites.values() if h != home)])
        deadline = time.monotonic() + 120
        while True:  # both SuperNodes joined through the proxy
            ls = subprocess.run(["flwr", "supernode", "ls", "admin", "--format", "json"],
                                env=admin_env, cwd=agg, capture_output=True, text=True,
                                timeout=60)
            nodes = json.loads(ls.stdout)["nodes"] if ls.returncode == 0 else []
            if sum(n["status"] == "online" for n in nodes) == len(SITES):
                break
            assert time.monotonic() < deadline, fed.detail(
                subprocess.CompletedProcess([], 1, ls.stdout, ls.stderr))
            time.sleep(2)
        yield fed
    finally:
        stop(procs)
        shutil.rmtree(top, ignore_errors=True)


def test_a_site_cannot_read_the_aggregators_folder(federation: Federation) -> None:
    """What the SuperNodes see: the same namespace recipe they were started in."""
    scenario = aggregator_scenario(federation.aggregator, federation.aggregator / "backbone", 1)
    assert scenario.is_file()
    peek = subprocess.run(hidden([federation.aggregator], ["sh", "-c", f'cat "{scenario}" || '
                                  f'umount "{federation.aggregator}"']),
                          capture_output=True, text=True, timeout=30)
    assert peek.returncode != 0 and "No such file" in peek.stderr, peek.stderr
    assert "must be superuser" in peek.stderr, peek.stderr


def test_sites_that_share_nothing_with_the_aggregator_train_two_rounds(
        federation: Federation) -> None:
    from fed_llama.adapter import read_manifest

    agg = federation.aggregator
    out = agg / "run"
    run = federation.submit(aggregator_scenario(agg, agg / "backbone", 2), out)
    detail = federation.detail(run)
    assert run.returncode == 0, detail
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history] == [1, 2], detail
    for row in history:
        assert (row["sites-sent"], row["sites-trained"], row["sites-refused"],
                row["sites-failed"]) == (2, 2, 0, 0), detail
        assert row["sites-evaluated"] == 2
    assert read_manifest(out / "rounds" / "round-002")["sites"] == ["site0", "site1"]
    assert (out / "seals" / "round-002.json").is_file()
    # each site installed the app package in its own Flower home
    for home in federation.sites.values():
        assert any((home / "flwr-home").rglob("fed_llama/client/app.py"))
    statuses = [r["status"] for r in federation.runs()]
    assert "finished:completed" in statuses, statuses


def test_a_run_no_site_can_train_fails_with_each_sites_reason(federation: Federation) -> None:
    agg = federation.aggregator
    out = agg / "run-refused"
    # the sites agreed to rank 8; this run asks for rank 4
    run = federation.submit(aggregator_scenario(agg, agg / "backbone", 2, lora_r=4), out)
    detail = federation.detail(run)
    [row] = json.loads((out / "history.json").read_text())
    reason = row["failed"]
    assert reason.startswith("round 1: 0 of 2 site(s) trained"), detail
    for site in SITES:
        assert (f"site '{site}' refuses the run: the run's lora.r is 4, the site agreed to 8"
                in reason), detail
    assert (row["sites-trained"], row["sites-failed"]) == (0, 2)
    assert not (out / "rounds").exists() or not any((out / "rounds").iterdir())
    assert not (out / "seals" / "round-002.json").exists()
    assert reason in run.stdout + run.stderr, detail  # the operator sees it in the stream
    statuses = {r["run-id"]: r["status"] for r in federation.runs()}
    assert sorted(statuses.values()).count("finished:failed") == 1, statuses


def test_a_site_side_flower_configuration_cannot_list_register_or_submit(
        federation: Federation, tmp_path: Path) -> None:
    """With the CA certificate and the Fleet API's address, the only address sites reach."""
    from fed_llama.crypto.transport import init_node

    init_node(tmp_path, "intruder")
    env, cwd = federation.site_env, tmp_path
    for cmd in (["flwr", "ls", "fleet"], ["flwr", "supernode", "ls", "fleet"],
                ["flwr", "supernode", "register", str(tmp_path / "nodes" / "intruder.pub"),
                 "fleet"],
                ["flwr", "run", str(ROOT), "fleet"]):
        done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=120)
        said = done.stdout + done.stderr
        assert done.returncode != 0 or "403" in said, " ".join(cmd[:3]) + "\n" + said
        assert "403" in said, " ".join(cmd[:3]) + "\n" + said
    # and nothing was registered or submitted
    nodes = subprocess.run(["flwr", "supernode", "ls", "admin", "--format", "json"],
                           env=federation.admin_env, cwd=federation.aggregator,
                           capture_output=True, text=True, timeout=60)
    assert "intruder" not in nodes.stdout
    assert len(json.loads(nodes.stdout)["nodes"]) == 2, nodes.stdout
