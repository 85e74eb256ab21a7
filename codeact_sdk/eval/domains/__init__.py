"""The evaluation domains: each module holds ordinary Python functions, the tools of that domain.

Tools are deterministic; their data comes from files in ../data, loaded into module-level literals so that
the code mode can ship them to the sandbox as source.
"""

from . import decoding, dna, travel, units, web

DOMAINS = {module.NAME: module for module in (decoding, units, dna, travel, web)}
