"""Writes deploy/kubernetes/components/monitoring/prometheusrule.yaml from alerts.yaml: the
same groups, as the prometheus-operator's PrometheusRule. Run it after changing the rules."""

import pathlib

import yaml



class Dumper(yaml.SafeDumper):
    """Sequences indented under their key, and text over a line as a block: as yamllint
    (deploy/.yamllint) wants the files."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


def text(dumper, value):
    style = ">" if len(value) > 80 and "\n" not in value.rstrip("\n") else ("|" if "\n" in value else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


Dumper.add_representer(str, text)


def dump(doc):
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)


here = pathlib.Path(__file__).resolve().parent
if __name__ == "__main__":
    rules = yaml.safe_load((here / "alerts.yaml").read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "llmq"},
        "spec": {"groups": rules["groups"]},
    }
    out = here.parent / "kubernetes/components/monitoring/prometheusrule.yaml"
    out.write_text(
        "# deploy/monitoring/alerts.yaml as a PrometheusRule (deploy/tests checks they hold the same\n"
        "# rules): regenerate it with `python3 deploy/monitoring/to_prometheusrule.py`.\n"
        + dump(doc)
    )
