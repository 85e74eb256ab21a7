"""The tools of the project's own suite, per domain: ordinary functions in codeact_sdk/eval/domains."""

from codeact_sdk.eval.domains import DOMAINS

TOOLS = {name: module.TOOLS for name, module in DOMAINS.items()}
