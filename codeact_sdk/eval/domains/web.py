"""Web-page lookups over a small fixed site."""

import json
import os

NAME = "web"

with open(os.path.join(os.path.dirname(__file__), "..", "data", "web.json")) as _handle:
    PAGES = json.load(_handle)


def fetch_page(url: str) -> str:
    """The text of a page of https://example.org (start at https://example.org/)."""
    if url not in PAGES:
        raise ValueError(f"404: no page at {url}")
    return PAGES[url]


def search_site(query: str) -> list:
    """URLs of the pages whose text contains every word of the query (case-insensitive)."""
    words = query.lower().split()
    return [url for url, text in PAGES.items() if all(word in text.lower() for word in words)]


TOOLS = [fetch_page, search_site]
