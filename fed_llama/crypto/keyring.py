"""The key folder ``fed-llama keys`` writes and the federation reads.

Layout::

    server.key          the aggregator's private keys (0600; the aggregator only)
    server.pub.json     its public keys (every site gets a copy)
    trust.json          the enrolled sites' public keys (the aggregator)
    sites/<site>.key    a site's private signing key (0600; that site only)
    sites/<site>.pub.json

In a deployment each party holds only its own files; in a simulation one folder holds all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fed_llama.crypto.keys import ServerKey, SiteKey, SitePublicKey, TrustStore
from fed_llama.crypto.refusal import Refused

log = logging.getLogger(__name__)


def passphrase_from_env(name: str) -> bytes | None:
    """The passphrase in environment variable ``name`` (empty name: no passphrase)."""
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise Refused("bad-key", f"security.passphrase_env names {name!r}, but that environment "
                      "variable is not set: export it, or leave passphrase_env empty")
    return value.encode("utf-8")


@dataclass(frozen=True)
class KeyFolder:
    """Paths of a key folder."""

    root: Path

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def server_public(self) -> Path:
        return self.root / "server.pub.json"

    @property
    def trust(self) -> Path:
        return self.root / "trust.json"

    def site_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.key"

    def site_public(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub.json"

    def init_server(self, kem: str, passphrase: bytes | None = None) -> ServerKey:
        """Write a new aggregator key pair and an empty trust store (kept if present)."""
        if self.server_key.exists():
            raise Refused("bad-key", f"{self.server_key} exists: keys are never overwritten; "
                          "choose another folder")
        key = ServerKey.generate(kem)
        key.save(self.server_key, passphrase)
        key.public().save(self.server_public)
        if not self.trust.exists():
            TrustStore().save(self.trust)
        return key

    def init_site(self, site: str, passphrase: bytes | None = None) -> SiteKey:
        """Write a new signing key for ``site``."""
        if self.site_key(site).exists():
            raise Refused("bad-key", f"{self.site_key(site)} exists: keys are never "
                          "overwritten; choose another folder")
        key = SiteKey.generate(site)
        key.save(self.site_key(site), passphrase)
        key.public().save(self.site_public(site))
        return key

    def enroll(self, public: Path, *, replace: bool = False) -> str:
        """Add a site's public key file to the trust store; return the site's name."""
        store = TrustStore.load(self.trust) if self.trust.exists() else TrustStore()
        pub = SitePublicKey.load(public)
        store.enroll(pub, replace=replace)
        store.save(self.trust)
        return pub.site

    def problems(self, sites: list[str]) -> list[str]:
        """What keeps this folder from serving a simulation of ``sites`` (every party here)."""
        out = []
        if not self.root.is_dir():
            return [f"key folder {str(self.root)!r} does not exist: run fed-llama keys "
                    f"init-server --dir {self.root}, or leave security.keys empty to have "
                    "the simulation make its own"]
        if not self.server_key.is_file():
            out.append(f"{self.server_key} is missing: run fed-llama keys init-server "
                       f"--dir {self.root}")
        enrolled = set(TrustStore.load(self.trust).sites) if self.trust.is_file() else set()
        for site in sites:
            if not self.site_key(site).is_file():
                out.append(f"{self.site_key(site)} is missing: run fed-llama keys init-site "
                           f"{site} --dir {self.root}")
            elif site not in enrolled:
                out.append(f"site {site!r} is not enrolled in {self.trust}: run fed-llama keys "
                           f"enroll {self.site_public(site)} --dir {self.root}")
        return out

    def ensure_simulation(self, sites: list[str], kem: str) -> None:
        """Make whatever is missing of a simulation's keys: every party runs here."""
        if not self.server_key.exists():
            self.init_server(kem)
            log.info("made the aggregator's %s keys in %s", kem, self.root)
        store = TrustStore.load(self.trust)
        for site in sites:
            if not self.site_key(site).exists():
                self.init_site(site)
            store.enroll(SiteKey.load(self.site_key(site)).public())
        store.save(self.trust)
