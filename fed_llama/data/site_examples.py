"""Which examples a federation's site gets, and the files they are read from.

A site's examples are its own source (``federation.sites[site]``) or, with ``federation.partition
= "dirichlet"``, its share of every source pooled and dealt out by
:func:`fed_llama.data.partition.partition_sites`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fed_llama.config.scenario import FederationConfig
from fed_llama.config.train import ICD10_PREFIX, DataConfig
from fed_llama.data.source import SiteExamples, load_examples

log = logging.getLogger(__name__)


def site_sources(fed: FederationConfig, site: int) -> list[str]:
    """The sources site ``site``'s examples come from (every source for a Dirichlet
    partition)."""
    return list(fed.sites) if fed.partition == "dirichlet" else [fed.sites[site]]


def site_examples(data: DataConfig, fed: FederationConfig, site: int, seed: int
                  ) -> SiteExamples:
    """Site ``site``'s raw examples, before tokenization."""
    if fed.partition == "dirichlet":
        from fed_llama.data.partition import partition_sites

        pools = [load_examples(dataclasses.replace(data, source=s), seed) for s in fed.sites]
        return partition_sites(pools, fed.num_partitions, fed.dirichlet_alpha, seed)[site]
    return load_examples(dataclasses.replace(data, source=fed.sites[site]), seed)


def input_files(data: DataConfig, fed: FederationConfig, site: int) -> list[Path]:
    """Every file :func:`site_examples` reads for site ``site``: its data files, the held-out
    file, and for ``icd10:`` sources the tabular list shipped by ``simple-icd-10-cm``
    (:class:`~fed_llama.errors.DataError` if that package is missing)."""
    sources = site_sources(fed, site)
    files = [Path(s) for s in [*sources, data.heldout] if s and not s.startswith(ICD10_PREFIX)]
    if any(s.startswith(ICD10_PREFIX) for s in sources):
        from fed_llama.data.icd10 import tabular_xml

        files.append(tabular_xml())
    return files
