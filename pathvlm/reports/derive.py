"""AJCC 8th edition pT and pN for colorectal carcinoma, computed from other fields, never generated."""

from __future__ import annotations

from dataclasses import dataclass

from pathvlm.reports.fields import Reason

# tumour extent (CAP resection) -> pT; the order follows depth of invasion
PT_FROM_EXTENT = {
    # AJCC Tis covers carcinoma in situ (high-grade dysplasia) and intramucosal carcinoma
    "No invasion (high grade dysplasia)": "pTis",
    "Invades lamina propria/muscularis mucosae (intramucosal carcinoma)": "pTis",
    "Invades submucosa": "pT1",
    "Invades into muscularis propria": "pT2",
    "Invades through muscularis propria into pericolorectal tissue": "pT3",
    "Invades visceral peritoneum": "pT4a",
    "Directly invades or adheres to adjacent structure(s)": "pT4b",
    "No evidence of primary tumor": "pT0",
}


@dataclass(frozen=True)
class Derived:
    """A derived value, or the reason there is none, with a note saying what it came from."""

    value: str | None
    reason: Reason | None
    note: str


def derive_pt(tumor_extent: str | None) -> Derived:
    """pT from the tumour extent of a resection (None when extent is not known)."""
    if tumor_extent is None:
        return Derived(None, Reason.cannot_be_determined_from_submitted_tissue,
                       "tumour extent is not known")
    pt = PT_FROM_EXTENT.get(tumor_extent)
    if pt is None:  # "Cannot be determined"
        return Derived(None, Reason.cannot_be_determined_from_submitted_tissue,
                       f"tumour extent: {tumor_extent}")
    return Derived(pt, None, f"from tumour extent: {tumor_extent}")


def derive_pn(positive: int | None, examined: int | None, deposits: str | None) -> Derived:
    """pN from the count of positive nodes, nodes examined and tumour deposits (AJCC 8th).

    N0 none of >=1 examined nodes and no deposits; N1a 1 node; N1b 2-3; N1c deposits without
    positive nodes; N2a 4-6; N2b >=7. Deposits change nothing once a node is positive.
    """
    if positive is None:
        return Derived(None, Reason.requires_gross_or_clinical_information,
                       "number of positive lymph nodes is not known")
    if examined is not None and positive > examined:
        return Derived(None, Reason.cannot_be_determined_from_submitted_tissue,
                       f"{positive} positive nodes exceed the {examined} examined")
    basis = f"{positive} positive of {examined if examined is not None else '?'} examined nodes"
    if positive == 0:
        if examined == 0:
            return Derived(None, Reason.cannot_be_determined_from_submitted_tissue,
                           "no lymph nodes examined")
        if deposits == "Present":
            return Derived("pN1c (deposits, no nodes)", None, f"{basis}; tumour deposits present")
        if deposits != "Not identified":
            return Derived(None, Reason.cannot_be_determined_from_submitted_tissue,
                           f"{basis}, but tumour deposits are not assessed (pN0 vs pN1c)")
        return Derived("pN0", None, f"{basis}; no tumour deposits")
    if positive == 1:
        value = "pN1a (1 node)"
    elif positive <= 3:
        value = "pN1b (2-3)"
    elif positive <= 6:
        value = "pN2a (4-6)"
    else:
        value = "pN2b (>=7)"
    return Derived(value, None, basis)
