"""Argument types shared by the command lines (codeact, codeact eval, codeact-model)."""

from __future__ import annotations

import argparse


def positive(kind: type, zero: bool = False):
    """An argparse type: a number above 0 (or at least 0), refused by the parser otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'more than 0'}: {text}")
        return value

    return parse
