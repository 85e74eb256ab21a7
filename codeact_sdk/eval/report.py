"""The results table: success rate, average turns and average tokens, per mode and per domain and mode."""

from __future__ import annotations

import json
from dataclasses import asdict

from .runner import Result, Run


def summarize(results: list[Result]) -> dict:
    if not results:
        return {"tasks": 0, "success_rate": 0.0, "avg_turns": 0.0, "avg_tokens": 0.0}
    return {
        "tasks": len(results),
        "success_rate": round(sum(r.success for r in results) / len(results), 4),
        "avg_turns": round(sum(r.turns for r in results) / len(results), 2),
        "avg_tokens": round(sum(r.prompt_tokens + r.completion_tokens for r in results) / len(results), 1),
        "errors": sum(r.stop == "error" for r in results),
        "turn_limits": sum(r.stop == "turn_limit" for r in results),
    }


def build(run: Run, results: list[Result]) -> dict:
    modes = run.modes
    domains = sorted({r.domain for r in results})
    return {
        "run": asdict(run),
        "by_mode": {mode: summarize([r for r in results if r.mode == mode]) for mode in modes},
        "by_domain": {domain: {mode: summarize([r for r in results if r.mode == mode and r.domain == domain])
                               for mode in modes} for domain in domains},
    }


def markdown(report: dict) -> str:
    run = report["run"]
    protocol = run["protocol"]
    lines = [f"## CodeAct evaluation: {run['model']}", "",
             f"Suite {run['suite']} {run['suite_version']}; model {run['model']} at {run['endpoint']}; "
             f"{run['date']}.", "",
             f"Protocol: turn limit {protocol['turn_limit']}, "
             f"{'feedback after a wrong answer' if protocol['feedback'] else 'no feedback (the first answer counts)'}, "
             f"{protocol['check']} answer checking, temperature {protocol['temperature']:g}, "
             f"at most {protocol['max_tokens']} tokens a reply.", "",
             "| mode | tasks | success rate | avg turns | avg tokens | turn limit hit | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, row in report["by_mode"].items():
        lines.append(f"| {mode} | {row['tasks']} | {row['success_rate']:.0%} | {row['avg_turns']:.1f} | "
                     f"{row['avg_tokens']:.0f} | {row.get('turn_limits', 0)} | {row.get('errors', 0)} |")
    modes = list(report["by_mode"])
    lines += ["", "Success rate by domain:", "", "| domain | " + " | ".join(modes) + " |",
              "|---|" + "---:|" * len(modes)]
    for domain, row in report["by_domain"].items():
        lines.append(f"| {domain} | " + " | ".join(f"{row[m]['success_rate']:.0%} ({row[m]['tasks']})"
                                                   for m in modes) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, json_path: str, markdown_path: str) -> str:
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=1)
    text = markdown(report)
    with open(markdown_path, "w") as handle:
        handle.write(text)
    return text
