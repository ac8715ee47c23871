"""Writes deploy/monitoring/grafana-dashboard.json: llmq's Grafana dashboard (a datasource
variable and a queue variable; every panel a timeseries of PromQL over the metrics the
binaries export). deploy/tests checks every expression parses (promtool) and names only
exported metrics. Run it after changing a panel: `python3 deploy/monitoring/dashboard.py`."""

import json
import pathlib

Q = 'queue=~"$queue"'

# (title, unit, [(legend, expr)]) by row.
ROWS = [
    ("Queues", [
        ("Backlog (ready and in flight)", "short", [("{{queue}}", f"max by (queue) (llmq_queue_backlog{{{Q}}})")]),
        ("Ready, delayed, dead", "short", [
            ("ready {{queue}}", f"max by (queue) (llmq_queue_ready{{{Q}}})"),
            ("delayed {{queue}}", f"max by (queue) (llmq_queue_delayed{{{Q}}})"),
            ("dead {{queue}}", f"max by (queue) (llmq_queue_dead{{{Q}}})"),
        ]),
        ("Oldest ready task", "s", [("{{queue}}", f"max by (queue) (llmq_queue_oldest_ready_age_seconds{{{Q}}})")]),
        ("Workers", "short", [("{{queue}}", f"max by (queue) (llmq_queue_workers{{{Q}}})")]),
    ]),
    ("Tasks", [
        ("Outcomes a second", "ops", [("{{outcome}}", f"sum by (outcome) (rate(llmq_tasks_total{{{Q}}}[$__rate_interval]))")]),
        ("Time waiting in the queue, p50 / p95", "s", [
            ("p50", f"histogram_quantile(0.5, sum by (le) (rate(llmq_task_wait_seconds_bucket{{{Q}}}[$__rate_interval])))"),
            ("p95", f"histogram_quantile(0.95, sum by (le) (rate(llmq_task_wait_seconds_bucket{{{Q}}}[$__rate_interval])))"),
        ]),
        ("Enqueue to result, p50 / p95", "s", [
            ("p50", f"histogram_quantile(0.5, sum by (le) (rate(llmq_task_latency_seconds_bucket{{{Q}}}[$__rate_interval])))"),
            ("p95", f"histogram_quantile(0.95, sum by (le) (rate(llmq_task_latency_seconds_bucket{{{Q}}}[$__rate_interval])))"),
        ]),
        ("Dead letters and cancels a second", "ops", [
            ("dead", f"sum(rate(llmq_tasks_total{{{Q},outcome=\"dead\"}}[$__rate_interval]))"),
            ("cancelled", f"sum(rate(llmq_tasks_cancelled_total{{{Q}}}[$__rate_interval]))"),
        ]),
    ]),
    ("Providers", [
        ("Calls a second by outcome", "ops", [("{{provider}} {{outcome}}", "sum by (provider, outcome) (rate(llmq_provider_calls_total[$__rate_interval]))")]),
        ("Error ratio", "percentunit", [("{{provider}}", 'sum by (provider) (rate(llmq_provider_calls_total{outcome!="ok"}[$__rate_interval])) / sum by (provider) (rate(llmq_provider_calls_total[$__rate_interval]))')]),
        ("Call latency p95", "s", [("{{provider}}/{{model}}", "histogram_quantile(0.95, sum by (le, provider, model) (rate(llmq_provider_call_seconds_bucket[$__rate_interval])))")]),
        ("Circuits open", "short", [("{{provider}}/{{model}}", "max by (provider, model) (llmq_circuit_open) > 0")]),
    ]),
    ("Spend and quotas", [
        ("Tokens a second", "short", [("{{provider}} {{kind}}", "sum by (provider, kind) (rate(llmq_tokens_total[$__rate_interval]))")]),
        ("Spend, dollars an hour", "currencyUSD", [("{{provider}}", "sum by (provider) (rate(llmq_cost_microdollars_total[$__rate_interval])) * 3600 / 1e6")]),
        ("Quota used", "percentunit", [("{{provider}} {{quota}}", "max by (provider, quota) (llmq_quota_used_ratio)")]),
        ("Tenant limits and budgets", "short", [
            ("held {{tenant}} {{limit}}", "sum by (tenant, limit) (increase(llmq_tenant_limited_total[$__rate_interval]))"),
            ("crossed {{tenant}} {{limit}} {{percent}}%", "sum by (tenant, limit, percent) (increase(llmq_tenant_budget_thresholds_total[1h]))"),
        ]),
    ]),
    ("Fleet", [
        ("Takeovers", "short", [("{{from}} {{queue}}", f"sum by (queue, from) (increase(llmq_takeovers_total{{{Q}}}[$__rate_interval]))")]),
        ("Scheduler leader", "short", [("leaders", "sum(llmq_scheduler_is_leader)")]),
        ("Ledger rows rejected", "short", [("rejected", "sum(increase(llmq_ledger_rows_rejected_total[$__rate_interval]))")]),
        ("Builds", "short", [("{{version}} {{commit}}", "count by (version, commit) (llmq_build_info)")]),
    ]),
]


def dashboard():
    panels, pid, y = [], 1, 0
    for row, items in ROWS:
        panels.append({"type": "row", "title": row, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(items):
            panels.append({
                "type": "timeseries", "title": title, "id": pid,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 6, "x": 6 * i, "y": y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(65 + k), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for k, (legend, expr) in enumerate(targets)
                ],
            })
            pid += 1
        y += 8
    return {
        "title": "llmq", "uid": "llmq", "schemaVersion": 39, "version": 1, "editable": True,
        "tags": ["llmq"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            {"name": "queue", "label": "Queue", "type": "query", "includeAll": True, "multi": True,
             "allValue": ".*", "refresh": 2,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(llmq_queue_backlog, queue)", "refId": "queues"},
             "definition": "label_values(llmq_queue_backlog, queue)"},
        ]},
        "panels": panels,
    }


if __name__ == "__main__":
    out = pathlib.Path(__file__).resolve().parent / "grafana-dashboard.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
