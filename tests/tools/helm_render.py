"""Renders a Helm chart offline with Helm's own Go SDK (the helm-python-sdk wheel bundles it),
as `helm template` would: `helm_render.py CHART RELEASE NAMESPACE VALUES_JSON` prints the
manifests as one YAML stream, each document headed by `# Source: <template>`, on stdout. A
template that fails (a `fail` in the chart, a bad value) exits 1 with Helm's message on stderr."""
import json
import sys

import helm_python


def main() -> int:
    chart, release, namespace, values = sys.argv[1:5]
    try:
        with helm_python.Chart.load(chart) as loaded:
            rendered = loaded.render(
                values=json.loads(values), name=release, namespace=namespace, is_install=True
            )
    except helm_python.HelmError as e:
        print(e, file=sys.stderr)
        return 1
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        print(f"---\n# Source: {template}\n{text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
