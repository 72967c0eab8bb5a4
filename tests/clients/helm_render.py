#!/usr/bin/env python3
"""Renders the chart offline with Helm v4's Go library (PyPI helm-python-sdk)
and checks every rendered object against Kubernetes' OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors). Prints one JSON
object: {"objects": [...rendered objects...], "problems": [...]}; exits 1
when a template does not render or an object does not validate.

usage: helm_render.py CHART_DIR [VALUES_JSON]   (the venv of scripts/tools.sh)
"""
import json
import sys

import helm_python
import kubernetes_validate
import yaml

K8S_VERSION = "1.33.0"


def main() -> int:
    chart = helm_python.Chart.load(sys.argv[1])
    values = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
    problems = []
    objects = []
    try:
        rendered = chart.render(values, name="demo", namespace="default")
    except Exception as e:  # the SDK's render and values errors
        print(json.dumps({"objects": [], "problems": [f"render: {e}"]}))
        return 1
    for path, text in sorted(rendered.items()):
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            objects.append(doc)
            what = f"{path}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{what}: {'.'.join(str(p) for p in e.path)}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{what}: no schema: {e}")
    print(json.dumps({"objects": objects, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
