"""Which federation a ClientApp serves, and as which site.

Three ways, in this order:

- ``fed-llama simulate`` builds the ClientApp around its scenario (every site on this
  machine; the node's ``partition-id`` is the site's position).
- A SuperNode whose node config names a site config (``site-config``): a real site. Its data,
  held-out data, keys, passphrase variable and backbone copy come from that file, the
  federation's settings from the run's messages (:mod:`fed_llama.config.run_settings`); the
  aggregator's files are never read. The site refuses a run whose method, adapter shape or
  backbone hash differ from its own, and every failure it reports names the site.
- Otherwise (``flwr run .`` on the Simulation Engine, where every party shares this machine):
  the scenario file the run config names, and the node's ``partition-id``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import MessageType

from fed_llama import wire
from fed_llama.config.run_config import load_scenario, scenario_path, with_key_folder
from fed_llama.config.run_settings import site_scenario
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.site import SITE_CONFIG, SiteConfig, load_site_config
from fed_llama.errors import ConfigError, FedLlamaError
from fed_llama.wire import BACKBONE_SHA256, SETTINGS, SITES


@dataclass(frozen=True)
class Membership:
    """The scenario a node trains in, and the site it is."""

    scenario: ScenarioConfig
    index: int
    """The site's position among the federation's sites."""
    name: str
    key_paths: Mapping[str, Any]
    """``site-key`` and ``server-public`` (empty: the scenario's key folder)."""


class SiteFailure(FedLlamaError):
    """A site's failure, as the aggregator reads it in the error reply: names the site."""


def is_site(node_config: Mapping[str, Any]) -> bool:
    """Whether this node is a real site with its own site config."""
    return SITE_CONFIG in node_config


@contextlib.contextmanager
def named(node_config: Mapping[str, Any]) -> Iterator[None]:
    """On a real site, re-raise any failure as a :class:`SiteFailure` whose one-line message
    starts with the site's name (what the aggregator's error for this node will say)."""
    if not is_site(node_config):
        yield
        return
    try:
        yield
    except SiteFailure:
        raise
    except Exception as exc:
        try:
            name = repr(site_config(str(node_config[SITE_CONFIG])).name)
        except FedLlamaError:
            name = f"with site config {node_config[SITE_CONFIG]!r}"
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise SiteFailure(text if text.startswith("site ") else f"site {name}: {text}"
                          ) from exc


@functools.lru_cache(maxsize=4)
def site_config(path: str) -> SiteConfig:
    return load_site_config(path)


@functools.lru_cache(maxsize=4)
def _backbone_sha256(name: str) -> str:
    from fed_llama.backbone.load import resolve_backbone

    return resolve_backbone(name).sha256


def shared_scenario(run_config: Mapping[str, Any]) -> ScenarioConfig:
    """The scenario named by ``run_config["scenario"]`` (a simulation's shared machine)."""
    scenario, _ = load_scenario(scenario_path(run_config))
    return with_key_folder(scenario, run_config)


def partition(node_config: Mapping[str, Any], scenario: ScenarioConfig) -> int:
    site = int(node_config.get("partition-id", -1))
    count = len(scenario.site_names())
    if not 0 <= site < count:
        raise ValueError(f"node_config partition-id {site} names no site of the scenario "
                         f"({count} sites)")
    return site


def membership(config: Mapping[str, Any], node_config: Mapping[str, Any],
               run_config: Mapping[str, Any], scenario: ScenarioConfig | None = None
               ) -> Membership:
    """This node's federation and site for a train or evaluate message whose config record is
    ``config`` (``scenario``: the one ``fed-llama simulate`` built the app around)."""
    if scenario is None and is_site(node_config):
        return _site_membership(config, str(node_config[SITE_CONFIG]))
    sc = scenario or shared_scenario(run_config)
    index = partition(node_config, sc)
    return Membership(sc, index, sc.site_names()[index], node_config)


def _site_membership(config: Mapping[str, Any], path: str) -> Membership:
    site = site_config(path)
    if site.backbone_cache:  # this ClientApp process's backbone cache (fed_llama.backbone)
        from fed_llama.backbone.cache import CACHE_ENV

        os.environ[CACHE_ENV] = site.backbone_cache
    scenario, index = site_scenario(config.get(SETTINGS), site)
    expected, own = config.get(BACKBONE_SHA256), _backbone_sha256(site.backbone)
    if expected != own:
        raise SiteFailure(f"site {site.name!r} refuses the run: its backbone {site.backbone!r} "
                          f"has sha256 {own[:12]}..., the aggregator's "
                          f"{str(expected)[:12]}...: both must use the same backbone file")
    if scenario.security.envelopes and not (site.site_key and site.server_public):
        raise SiteFailure(f"site {site.name!r}: the federation signs and encrypts updates "
                          "(security.envelopes): set site_key and server_public in the site "
                          f"config {path}")
    return Membership(scenario, index, site.name, {"site-key": site.site_key,
                                                   "server-public": site.server_public})


def queried_site(config: Mapping[str, Any], node_config: Mapping[str, Any],
                 run_config: Mapping[str, Any], scenario: ScenarioConfig | None = None) -> int:
    """The site index to answer a cyclic federation's query with."""
    if scenario is None and is_site(node_config):
        site = site_config(str(node_config[SITE_CONFIG]))
        names = config.get(SITES)
        if not isinstance(names, list) or site.name not in names:
            raise ConfigError(f"site {site.name!r} is not among the federation's sites "
                              f"{names!r}: set name in the site config to the aggregator's "
                              "name for this site")
        return names.index(site.name)
    return partition(node_config, scenario or shared_scenario(run_config))


def training_membership(msg: Any, context: Any, scenario: ScenarioConfig | None
                        ) -> Membership | None:
    """This node's membership for a training message in fed-llama's layout (its config and
    arrays records), or None for any other message (an evaluation, a query, a SecAgg+
    round's legacy layout): what a ClientApp mod that acts on training asks first."""
    content = msg.content
    if (msg.metadata.message_type.partition(".")[0] != MessageType.TRAIN
            or wire.CONFIG not in content.config_records
            or wire.ARRAYS not in content.array_records):
        return None
    return membership(content.config_records[wire.CONFIG], context.node_config,
                      context.run_config, scenario)
