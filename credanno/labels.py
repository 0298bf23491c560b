"""The nine radiologist ratings of LIDC-IDRI and how cRedAnno turns them into labels.

Labels are 0-based class indices (-1 = missing). Malignancy is binarised from the
nodule's median rating (< 3 benign = 0, > 3 malignant = 1, == 3 excluded); the eight
attributes are the rounded median rating minus one (numpy rounds halves to even).
Words follow the LIDC-IDRI radiologist annotation instructions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSpec:
    name: str
    n_classes: int
    words: tuple[str, ...]
    short: str
    #: Attribute predictions count as correct within +/-tolerance (the paper's metric).
    tolerance: int = 1
    in_summary: bool = True


MALIGNANCY = LabelSpec("malignancy", 2, ("benign", "malignant"), "Mal", tolerance=0)

ATTRIBUTES: tuple[LabelSpec, ...] = (
    LabelSpec("subtlety", 5, ("extremely subtle", "moderately subtle", "fairly subtle",
                              "moderately obvious", "obvious"), "Sub"),
    LabelSpec("internalStructure", 4, ("soft tissue", "fluid", "fat", "air"), "Int",
              in_summary=False),
    LabelSpec("calcification", 6, ("popcorn", "laminated", "solid", "non-central", "central",
                                   "absent"), "Cal"),
    LabelSpec("sphericity", 5, ("linear", "ovoid/linear", "ovoid", "ovoid/round", "round"), "Sph"),
    LabelSpec("margin", 5, ("poorly defined", "near poorly defined", "medium",
                            "near sharp", "sharp"), "Mar"),
    LabelSpec("lobulation", 5, ("no lobulation", "nearly no lobulation", "medium lobulation",
                                "near marked lobulation", "marked lobulation"), "Lob"),
    LabelSpec("spiculation", 5, ("no spiculation", "nearly no spiculation", "medium spiculation",
                                 "near marked spiculation", "marked spiculation"), "Spi"),
    LabelSpec("texture", 5, ("non-solid/GGO", "non-solid/mixed", "part-solid/mixed",
                             "solid/mixed", "solid"), "Tex"),
)

#: Every label, malignancy first, then the attributes in LIDC's order.
LABELS: tuple[LabelSpec, ...] = (MALIGNANCY, *ATTRIBUTES)
LABEL_NAMES: tuple[str, ...] = tuple(s.name for s in LABELS)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(s.name for s in ATTRIBUTES)
#: The seven attributes the paper's tables report (internalStructure left out).
SUMMARY_ATTRIBUTES: tuple[str, ...] = tuple(s.name for s in ATTRIBUTES if s.in_summary)
#: Number of rating levels of each LIDC rating (malignancy is rated 1-5 before binarising).
RATING_LEVELS: dict[str, int] = {"malignancy": 5, **{s.name: s.n_classes for s in ATTRIBUTES}}

_BY_NAME = {s.name: s for s in LABELS}


def label_spec(name: str) -> LabelSpec:
    """Look a label up by name; an unknown name raises an error listing the valid ones."""
    from credanno.errors import CredannoError

    try:
        return _BY_NAME[name]
    except KeyError:
        raise CredannoError(
            f"unknown label {name!r}; valid labels: {', '.join(LABEL_NAMES)}"
        ) from None
