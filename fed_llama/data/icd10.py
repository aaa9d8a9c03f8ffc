"""Built-in, offline demo data: ICD-10-CM hospital sites.

The ``simple-icd-10-cm`` package ships the ICD-10-CM tabular list (CDC/NCHS, a US government
work). Each chapter becomes a hospital site (cardiology = circulatory system, ...). Each code
yields up to four question/answer pairs: description -> code, code -> description, what the
code includes, what it excludes. The held-out split is by code: every question about a
held-out code is held out, so no held-out code is seen in training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fed_llama.config.train import ICD10_TASKS
from fed_llama.data.records import Example
from fed_llama.errors import DataError

#: site name -> (chapter number in the tabular list, what the site is)
SITES: dict[str, tuple[str, str]] = {
    "infectious-disease": ("1", "Certain infectious and parasitic diseases (A00-B99)"),
    "oncology": ("2", "Neoplasms (C00-D49)"),
    "endocrinology": ("4", "Endocrine, nutritional and metabolic diseases (E00-E89)"),
    "psychiatry": ("5", "Mental, behavioral and neurodevelopmental disorders (F01-F99)"),
    "neurology": ("6", "Diseases of the nervous system (G00-G99)"),
    "cardiology": ("9", "Diseases of the circulatory system (I00-I99)"),
    "pulmonology": ("10", "Diseases of the respiratory system (J00-J99)"),
    "gastroenterology": ("11", "Diseases of the digestive system (K00-K95)"),
    "dermatology": ("12", "Diseases of the skin and subcutaneous tissue (L00-L99)"),
    "nephrology": ("14", "Diseases of the genitourinary system (N00-N99)"),
    "obstetrics": ("15", "Pregnancy, childbirth and the puerperium (O00-O9A)"),
    "neonatology": ("16", "Certain conditions originating in the perinatal period (P00-P96)"),
}
TASKS = ICD10_TASKS  # the question kinds, in the order questions() yields them
MAX_NOTES = 6  # notes per answer: keeps answers within a few dozen tokens
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Code:
    """One ``<diag>`` entry of the tabular list."""

    code: str
    description: str
    includes: tuple[str, ...]
    excludes1: tuple[str, ...]
    excludes2: tuple[str, ...]


@dataclass(frozen=True)
class SiteSplit:
    """A site's training and held-out examples, split by code."""

    site: str
    train: list[Example]
    heldout: list[Example]
    num_codes: int
    num_heldout_codes: int


def tabular_xml() -> Path:
    """The tabular-list XML shipped by ``simple-icd-10-cm`` (its name changes each release).

    Found without importing the package: its import parses the whole code set (about 4 s),
    which every fresh ClientApp process would pay again."""
    spec = importlib.util.find_spec("simple_icd_10_cm")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ICD-10 demo data needs simple-icd-10-cm: "
                        "pip install simple-icd-10-cm")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    found = sorted((p for p in (folder.iterdir() if folder.is_dir() else [])
                    if p.name.startswith("icd10c-tabular") and p.name.endswith(".xml")),
                   key=lambda p: p.name)
    if not found:
        raise DataError(f"no ICD-10-CM tabular XML found in {folder}: reinstall simple-icd-10-cm")
    return found[-1]


def _notes(elem: ET.Element, tag: str) -> tuple[str, ...]:
    return tuple(" ".join((n.text or "").split()) for child in elem.findall(tag)
                 for n in child.findall("note") if (n.text or "").strip())


@lru_cache(maxsize=4)
def chapter_codes(chapter: str) -> tuple[Code, ...]:
    """Every code of a chapter, in tabular order."""
    root = ET.parse(tabular_xml()).getroot()
    for ch in root.findall("chapter"):
        if ch.findtext("name") == chapter:
            return tuple(
                Code(code=d.findtext("name", "").strip(),
                     description=" ".join(d.findtext("desc", "").split()),
                     includes=_notes(d, "inclusionTerm") + _notes(d, "includes"),
                     excludes1=_notes(d, "excludes1"), excludes2=_notes(d, "excludes2"))
                for d in ch.iter("diag"))
    raise DataError(f"chapter {chapter} not found in {tabular_xml().name}")


ANSWERS = ("code", "chapter-code")
"""How a description -> code question is answered: ``code`` (``I70.435``) or ``chapter-code``,
the chapter's title and then the code (``Diseases of the circulatory system: I70.435``)."""


def chapter_title(site: str) -> str:
    """The site's chapter title without its code range ("Neoplasms")."""
    return SITES[site][1].rsplit(" (", 1)[0]


def questions(code: Code, site: str, answer: str = "code") -> list[Example]:
    """The question/answer pairs one code yields (``answer``: one of :data:`ANSWERS`)."""
    coded = f"{chapter_title(site)}: {code.code}" if answer == "chapter-code" else code.code
    pairs = [("desc2code", f'What is the ICD-10-CM code for "{code.description}"?', coded),
             ("code2desc", f"What does ICD-10-CM code {code.code} describe?", code.description)]
    if code.includes:
        pairs.append(("includes", f"What does ICD-10-CM code {code.code} include?",
                      "; ".join(code.includes[:MAX_NOTES])))
    if code.excludes1 or code.excludes2:
        parts = []
        if code.excludes1:
            parts.append("Excludes1: " + "; ".join(code.excludes1[:MAX_NOTES]))
        if code.excludes2:
            parts.append("Excludes2: " + "; ".join(code.excludes2[:MAX_NOTES]))
        pairs.append(("excludes", f"What does ICD-10-CM code {code.code} exclude?",
                      ". ".join(parts)))
    return [Example(messages=({"role": "user", "content": q}, {"role": "assistant", "content": a}),
                    meta={"code": code.code, "task": task, "site": site})
            for task, q, a in pairs]


def is_heldout(code: str, seed: int, fraction: float = HELDOUT_FRACTION) -> bool:
    """A stable, seeded choice of held-out codes (independent of file order)."""
    digest = hashlib.sha256(f"{seed}:{code}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def check_site(site: str) -> str:
    """The site's chapter number, or a DataError listing the sites."""
    if site not in SITES:
        raise DataError(f"unknown ICD-10 site {site!r}: choose one of {', '.join(SITES)}")
    return SITES[site][0]


def site_split(site: str, seed: int = 0, answer: str = "code") -> SiteSplit:
    """A site's examples split by code into training and held-out sets (``answer``: how
    description -> code questions are answered, one of :data:`ANSWERS`)."""
    if answer not in ANSWERS:
        raise DataError(f"unknown ICD-10 answer format {answer!r}: choose one of "
                        f"{', '.join(ANSWERS)}")
    codes = chapter_codes(check_site(site))
    train: list[Example] = []
    heldout: list[Example] = []
    held = 0
    for code in codes:
        out = is_heldout(code.code, seed)
        held += out
        (heldout if out else train).extend(questions(code, site, answer))
    return SiteSplit(site=site, train=train, heldout=heldout, num_codes=len(codes),
                     num_heldout_codes=held)
