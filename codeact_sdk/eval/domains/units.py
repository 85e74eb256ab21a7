"""Unit and price calculations over a fixed price list (prices per kg, olive oil per litre)."""

import json
import os

NAME = "units"

with open(os.path.join(os.path.dirname(__file__), "..", "data", "prices.json")) as _handle:
    PRICES = json.load(_handle)

FACTORS = {"g": ("mass", 0.001), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237), "oz": ("mass", 0.028349523125),
           "ml": ("volume", 0.001), "l": ("volume", 1.0), "m": ("length", 1.0), "km": ("length", 1000.0),
           "mi": ("length", 1609.344), "ft": ("length", 0.3048)}


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """Convert between g, kg, lb, oz (mass), ml, l (volume), m, km, mi, ft (length)."""
    kind_from, factor_from = FACTORS[from_unit]
    kind_to, factor_to = FACTORS[to_unit]
    if kind_from != kind_to:
        raise ValueError(f"cannot convert {from_unit} to {to_unit}")
    return value * factor_from / factor_to


def get_price(item: str) -> float:
    """Price of one kg of an item (one litre for olive oil), in euros."""
    return PRICES[item]


def apply_discount(price: float, percent: float) -> float:
    """The price after a discount of `percent` percent."""
    return price * (1 - percent / 100)


def add_tax(price: float, rate_percent: float) -> float:
    """The price with a tax of `rate_percent` percent added."""
    return price * (1 + rate_percent / 100)


TOOLS = [convert_units, get_price, apply_discount, add_tax]
