"""Answer checking, tolerant of form: numbers within rounding, strings without case or surrounding
punctuation, comma-separated lists element by element. Or exact, for protocols that ask for it."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")
STRIP = " \t\n\"'`.;:!()[]{}<>"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", str(text).strip().strip(STRIP).lower())


def as_number(text: object) -> float | None:
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    match = NUMBER.search(str(text))
    if not match:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def numbers_match(expected: float, given: float) -> bool:
    return abs(expected - given) <= max(0.01, 1e-6 * abs(expected))


def item_matches(expected: object, given: str) -> bool:
    expected_number = as_number(expected) if re.fullmatch(r"\s*-?[\d.,]+\s*", str(expected)) else None
    if expected_number is not None:
        given_number = as_number(given)
        return given_number is not None and numbers_match(expected_number, given_number)
    return normalize(given) == normalize(str(expected))


def check(answer_type: str, expected: object, given: str | None, exact: bool = False) -> bool:
    """Whether `given` answers `expected`; exact: the same text, surrounding whitespace aside."""
    if given is None:
        return False
    if exact:
        return str(given).strip() == str(expected).strip()
    if answer_type == "number":
        # The last number in the answer: "3 items cost 12.5" answers 12.5.
        numbers = [as_number(match.group(0)) for match in NUMBER.finditer(str(given))]
        numbers = [n for n in numbers if n is not None]
        return bool(numbers) and numbers_match(float(expected), numbers[-1])
    if answer_type == "list":
        wanted = [part.strip() for part in str(expected).split(",")]
        got = [part.strip() for part in str(given).strip().strip(STRIP).split(",")]
        return len(wanted) == len(got) and all(item_matches(w, g) for w, g in zip(wanted, got, strict=True))
    return normalize(given) == normalize(str(expected))
