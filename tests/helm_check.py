#!/usr/bin/env python3
"""Static checks of the Helm chart (the helm binary is not available here):
Chart.yaml and values.yaml parse, values validate against values.schema.json,
and every `.Values.x.y` a template references exists in the values.

usage: helm_check.py CHART_DIR [VALUES_FILE] [EXTRA_TEMPLATE]
"""
import json
import pathlib
import re
import sys

import jsonschema
import yaml


def main() -> int:
    chart = pathlib.Path(sys.argv[1])
    values_file = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else chart / "values.yaml"
    problems = []
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    for key in ("apiVersion", "name", "version"):
        if not meta.get(key):
            problems.append(f"Chart.yaml: {key} is missing")
    if meta.get("apiVersion") != "v2":
        problems.append("Chart.yaml: apiVersion must be v2")
    values = yaml.safe_load(values_file.read_text())
    schema = json.loads((chart / "values.schema.json").read_text())
    for err in jsonschema.Draft7Validator(schema).iter_errors(values):
        path = ".".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"{values_file.name}: {path}: {err.message}")
    templates = sorted((chart / "templates").glob("*"))
    if len(sys.argv) > 3:
        templates.append(pathlib.Path(sys.argv[3]))
    refs = 0
    for t in templates:
        for m in re.finditer(r"\.Values((?:\.[A-Za-z0-9_]+)+)", t.read_text()):
            refs += 1
            node = values
            for part in m.group(1).strip(".").split("."):
                if not isinstance(node, dict) or part not in node:
                    problems.append(f"{t.name}: .Values{m.group(1)} is not in the values")
                    break
                node = node[part]
    for p in problems:
        print(p)
    print(f"{len(templates)} templates, {refs} value references, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
