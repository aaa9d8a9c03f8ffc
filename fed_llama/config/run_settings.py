"""The federation's settings as they travel to the sites, and the scenario a site rebuilds.

On Flower's Deployment Engine a site has its own machine: it cannot read the aggregator's
scenario file, and the aggregator does not know where a site keeps its data or keys. The
ServerApp therefore sends what the federation decides (rounds, aggregation, local training,
the data encoding, the adapter's method and its settings (only the chosen method's section),
the security and privacy policy) with every
training and evaluation message, as JSON under :data:`SETTINGS`, with the backbone's hash
under :data:`BACKBONE_SHA256`. What is the aggregator's own (its key folder, its passphrase
variable, its paths to the backbone and to data) and the simulation-only ``[attack]`` are left
out. A site combines them with its :class:`~fed_llama.config.site.SiteConfig`
(:func:`site_scenario`); a malformed or unknown setting is refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fed_llama.common.bounded_json import BadJson, loads
from fed_llama.config.adapter import SECTIONS, method_label
from fed_llama.config.loader import build_config
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.site import SiteConfig
from fed_llama.errors import ConfigError
from fed_llama.wire import SETTINGS

_AGGREGATOR_ONLY = {("backbone", "name"), ("security", "keys"), ("security", "passphrase_env"),
                    ("data", "source"), ("data", "heldout")}


def method(scenario: ScenarioConfig) -> str:
    """The run's adapter method as a site config names it: ``qlora`` for LoRA on a 4-bit NF4
    backbone, else the method's name (``lora``, ``llama-adapter``, ...)."""
    return method_label(scenario.method, scenario.backbone.quantization)


def federation_settings(scenario: ScenarioConfig) -> str:
    """The settings the sites need, as JSON (the aggregator's own paths and secrets left out;
    ``federation.sites`` becomes the sites' names)."""
    data = dataclasses.asdict(scenario)
    data.pop("attack")
    for table, key in _AGGREGATOR_ONLY:
        data[table].pop(key)
    data["federation"]["sites"] = scenario.site_names()
    for name, section in SECTIONS.items():  # only the chosen method's settings travel
        if name not in ("lora", scenario.method):
            data.pop(section)
    return json.dumps(data, sort_keys=True)


def site_scenario(settings: object, site: SiteConfig) -> tuple[ScenarioConfig, int]:
    """The scenario this site trains in: the federation's ``settings`` (the JSON text of
    :func:`federation_settings`) with the site's own backbone, data and passphrase variable;
    and the site's position among the federation's sites. Raises ConfigError (one line) for
    settings that are malformed, that do not name this site, or whose method or adapter shape
    differ from what the site agreed to."""
    if not isinstance(settings, str):
        raise ConfigError(f"the run's messages carry no federation settings ({SETTINGS}): is the "
                          "aggregator running fed-llama's ServerApp of the same version?")
    try:
        data: Any = loads(settings, max_bytes=1 << 20)
    except BadJson as exc:
        raise ConfigError(f"the run's federation settings are not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(t), dict) for t in (
            "backbone", "data", "federation", "security")):
        raise ConfigError("the run's federation settings are not a scenario's tables")
    names = data["federation"].get("sites")
    if not isinstance(names, list) or site.name not in names:
        raise ConfigError(f"the federation's sites are {str(names)[:200]}; this site's config "
                          f"names {site.name!r}: set name in the site config to the aggregator's "
                          "name for this site")
    index = names.index(site.name)
    data["backbone"]["name"] = site.backbone
    data["data"]["source"] = site.source
    data["data"]["heldout"] = site.heldout
    data["security"]["passphrase_env"] = site.passphrase_env
    data["federation"]["sites"] = [site.source if i == index else n
                                   for i, n in enumerate(names)]
    try:
        scenario = build_config(ScenarioConfig, data, source="the run's federation settings")
    except ConfigError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    problems = _mismatches(scenario, site)
    if problems:
        raise ConfigError(f"site {site.name!r} refuses the run: " + "; ".join(problems))
    return scenario, index


def _mismatches(scenario: ScenarioConfig, site: SiteConfig) -> list[str]:
    out = []
    if method(scenario) != site.method:
        out.append(f"the run trains {method(scenario)}, the site agreed to {site.method}")
    if scenario.method == "lora":
        run, own = scenario.lora, site.lora
        for what, theirs, ours in (("r", run.r, own.r), ("alpha", run.alpha, own.alpha),
                                   ("modules", list(run.modules()), list(own.modules()))):
            if theirs != ours:
                out.append(f"the run's lora.{what} is {theirs}, the site agreed to {ours}")
    elif method(scenario) == site.method:  # the same method: its settings must be the same
        quantization = scenario.backbone.quantization
        if quantization != site.quantization:
            out.append(f"the run's backbone.quantization is {quantization!r}, the site agreed "
                       f"to {site.quantization!r}")
        section = SECTIONS[scenario.method]
        theirs, ours = scenario.method_config(), getattr(site, section)
        for f in dataclasses.fields(theirs):
            if getattr(theirs, f.name) != getattr(ours, f.name):
                out.append(f"the run's {section}.{f.name} is {getattr(theirs, f.name)!r}, the "
                           f"site agreed to {getattr(ours, f.name)!r}")
    if scenario.federation.partition != "sites":
        out.append("a Dirichlet partition needs every site's data in one place: use "
                   "partition = 'sites' for real sites")
    if scenario.secure_aggregation.enabled:
        out.append("secure aggregation with site configs is not supported yet")
    return out
