"""Travel-plan lookups over a small fixed table of flights, hotels and cities."""

import json
import os

NAME = "travel"

with open(os.path.join(os.path.dirname(__file__), "..", "data", "travel.json")) as _handle:
    _DATA = json.load(_handle)
FLIGHTS = _DATA["flights"]
HOTELS = _DATA["hotels"]
CITIES = _DATA["cities"]


def find_flights(origin: str, destination: str) -> list:
    """Direct flights from origin to destination: dicts with flight, price (euros), depart, arrive."""
    return [dict(f) for f in FLIGHTS if f["origin"] == origin and f["destination"] == destination]


def get_hotel_price(city: str, nights: int) -> float:
    """Total price in euros of a hotel in `city` for `nights` nights."""
    return HOTELS[city] * nights


def get_city_info(city: str) -> dict:
    """A city's country, timezone and population."""
    return dict(CITIES[city])


TOOLS = [find_flights, get_hotel_price, get_city_info]
