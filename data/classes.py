"""Which label classes are vehicles: chosen with ``--classes`` (ids or names), never assumed.

aerosynth detects one class, ``vehicle``. Label files often hold several (DOTA, xView, a COCO
export with planes and ships), so the classes that are vehicles must be chosen:

* not chosen (the default): the vehicle class is YOLO class ``0``, the lowest COCO category id or
  GeoJSON ``class_id`` 0; a box of any other class is refused with an error naming the file, the
  line (or annotation) and the id, so that nothing is silently turned into a car;
* chosen (``--classes 0,1`` or ``--classes car,truck``, or by a preset): boxes of the chosen classes
  are vehicles and boxes of every other class are dropped, and counted (``dropped_boxes`` in the
  manifest).

Numbers are YOLO class ids or COCO category ids; names come from a ``data.yaml`` (``names:``) in the
YOLO folder or from the COCO ``categories``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from aerosynth.data.errors import InputError

if TYPE_CHECKING:
    from aerosynth.data.domains import Domain

NAMES_FILE = "data.yaml"


def parse_classes(text: str, where: str = "--classes") -> list[str]:
    """The comma-separated class ids or names of ``--classes`` (``"0,1"``, ``"car, large vehicle"``).

    Raises:
        InputError: nothing but commas and spaces.
    """
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise InputError(where, "give class ids or names, e.g. 0,1 or car,truck")
    return tokens


def read_yolo_names(path: Path) -> dict[int, str]:
    """Class id -> name from an ultralytics ``data.yaml`` (``names:`` as a list or an id: name mapping).

    Returns:
        ``{}`` when the file has no ``names``.

    Raises:
        InputError: unreadable YAML, or ``names`` that is neither a list nor a mapping of ids.
    """
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(path, f"unreadable YAML ({exc.__class__.__name__})") from None
    names = doc.get("names") if isinstance(doc, dict) else None
    if names is None:
        return {}
    if isinstance(names, list):
        return {i: str(n) for i, n in enumerate(names)}
    if isinstance(names, dict):
        try:
            return {int(k): str(v) for k, v in names.items() if not isinstance(k, bool)}
        except (TypeError, ValueError):
            pass
    raise InputError(path, "'names' must be a list of class names or a mapping of class id to name")


def resolve_class(token: str, vocabulary: dict[int, str]) -> set[int]:
    """The label ids that ``token`` (an id or a name) means in a domain with these class names.

    An id is taken as it is when the domain has no names, else only when it is one of them; a name
    matches exactly, or else ignoring case.
    """
    if token.isdigit():
        cid = int(token)
        return {cid} if not vocabulary or cid in vocabulary else set()
    exact = {i for i, n in vocabulary.items() if n == token}
    return exact or {i for i, n in vocabulary.items() if n.casefold() == token.casefold()}


def describe_classes(vocabulary: dict[int, str], limit: int = 12, ids: Iterable[int] | None = None) -> str:
    """``0=car, 1=truck, ...`` for messages; without names, the ``ids`` its labels hold."""
    if not vocabulary:
        found = [str(i) for i in sorted(ids or ())]
        listed = "ids " + ", ".join(found[:limit]) + (", ..." if len(found) > limit else "") if found else "no box"
        return f"{listed}, no names (a data.yaml with names: gives them)"
    items = [f"{i}={n}" for i, n in sorted(vocabulary.items())]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} classes)" if len(items) > limit else "")


def choose_classes(domains: Sequence[Domain], tokens: Iterable[str], where: str = "--classes") -> None:
    """Set each domain's vehicle classes to what ``tokens`` name in it.

    A domain in which no token names a class keeps the default (class 0 only, others refused). An id names a
    class of a domain without names (no ``data.yaml``) when some domain holds it: one of its names, or an id its
    label files hold (:meth:`~aerosynth.data.domains.Domain.known_class_ids`).

    Raises:
        InputError: a token that names a class in none of the domains.
    """
    tokens = list(tokens)
    domains = list({id(d): d for d in domains}.values())
    known_ids: dict[int, set[int]] = {}

    def known(domain: Domain) -> set[int]:  # read once, and only when an id or a message needs it
        if id(domain) not in known_ids:
            known_ids[id(domain)] = domain.known_class_ids()
        return known_ids[id(domain)]

    used = {t for t in tokens if t.isdigit() and any(int(t) in known(d) for d in domains)}
    for domain in domains:
        chosen: set[int] = set()
        for token in tokens:
            ids = resolve_class(token, domain.class_vocabulary) if token in used or not token.isdigit() else set()
            if ids:
                used.add(token)
                chosen |= ids
        if chosen:
            domain.classes = frozenset(chosen)
        else:
            domain.classes_asked = tuple(tokens)
    unknown = [t for t in tokens if t not in used]
    if unknown:
        known = "; ".join(f"{d.name}: {describe_classes(d.class_vocabulary, ids=known(d))}" for d in domains)
        raise InputError(where, f"{unknown[0]!r} is not a class of any domain ({known})")


def first_yolo_line(text: str, class_id: int) -> int | None:
    """The 1-based line of the first YOLO row of ``class_id`` (``None`` when there is none)."""
    for lineno, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        parts = line.split()
        try:
            if parts and float(parts[0]) == class_id:
                return lineno
        except ValueError:
            continue
    return None
