#!/usr/bin/env python3
"""`helm lint` of a chart by Helm v4's own Go library (PyPI helm-sdkpy):
Chart.yaml checked, values validated against values.schema.json, every
template rendered and the output parsed as YAML, as `helm lint` does.
Prints one line per message and a summary line; exits 1 when there is any
warning or error (infos are printed and allowed). The library reports a
message's severity and file, not its text.

usage: helm_lint.py CHART_DIR   (run with the Python >= 3.12 venv of scripts/tools.sh)
"""
import asyncio
import sys

import helm_sdkpy

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def main() -> int:
    chart = sys.argv[1]
    config = helm_sdkpy.Configuration(namespace="default")
    result = asyncio.run(helm_sdkpy.Lint(config).run(chart))
    messages = result.get("Messages") or []
    bad = 0
    for m in messages:
        sev = m.get("Severity", 0)
        print(f"{SEVERITY.get(sev, sev)} {m.get('Path', '')}")
        if sev >= 2:
            bad += 1
    errors = len(result.get("Errors") or [])
    print(f"{helm_sdkpy.get_version()} (Helm v4) lint: {result.get('TotalChartsLinted', 0)} chart(s), "
          f"{len(messages)} message(s), {bad} warning(s) or error(s), {errors} error(s)")
    return 1 if bad or errors or not result.get("TotalChartsLinted") else 0


if __name__ == "__main__":
    sys.exit(main())
