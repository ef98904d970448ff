#!/usr/bin/env python3
"""Builds the Grafana dashboards in this directory from the panel lists below.

    python3 dashboards/build.py          # rewrite overview.json and cost-capacity.json
    python3 dashboards/build.py --check  # exit 1 if the committed JSON is out of date

The JSON files are what operators import or provision; this script only keeps them consistent
(ids, grid positions, datasource references, the instance filter on every selector). Every
query is evaluated against a real Prometheus scraping the dispatcher by `tests/dashboards.rs`.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
# Every selector is filtered on the dispatcher chosen in the `instance` variable.
I = 'instance=~"$instance"'
RI = "$__rate_interval"
Q_50_95_99 = 'quantile=~"0.5|0.95|0.99"'
Q_50_95 = 'quantile=~"0.5|0.95"'
Q_50_99 = 'quantile=~"0.5|0.99"'
FAILED = 'error="1"'
NOT_INUSE = 'category!="inuse"'
CREATE_REFUSED = 'operation="Create",kind=~"quota|capacity"'


def m(name, labels=""):
    """A selector of one dispatcher metric, filtered on $instance."""
    inner = I if not labels else f"{labels},{I}"
    return f"{name}{{{inner}}}"


def dc(name, labels=""):
    return m("arvados_dispatchcloud_" + name, labels)


def panel(title, description, targets, kind="timeseries", unit=None, w=12, h=8,
          stack=False, decimals=None, min0=True):
    fc = {"defaults": {}, "overrides": []}
    if unit:
        fc["defaults"]["unit"] = unit
    if decimals is not None:
        fc["defaults"]["decimals"] = decimals
    if min0 and kind == "timeseries":
        fc["defaults"]["min"] = 0
    if kind == "timeseries":
        fc["defaults"]["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 0,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "showPoints": "never",
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    elif kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    else:
        raise ValueError(kind)
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": fc,
        "options": options,
        "targets": [
            {
                "datasource": DS,
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "range": kind == "timeseries",
                "instant": kind != "timeseries",
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "_w": w,
        "_h": h,
    }


def row(title):
    return {"type": "row", "title": title, "datasource": DS, "collapsed": False, "panels": [],
            "_w": 24, "_h": 1}


def layout(items):
    """Assign ids and grid positions: left to right, wrapping at 24 columns."""
    x = y = row_h = 0
    out = []
    for n, p in enumerate(items, start=1):
        w, h = p.pop("_w"), p.pop("_h")
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = n
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        row_h = max(row_h, h)
        if x >= 24:
            x, y, row_h = 0, y + row_h, 0
        out.append(p)
    return out


def dashboard(uid, title, description, items):
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["arvados", "arvados-dispatch-cloud"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 41,
        "version": 1,
        "refresh": "1m",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                },
                {
                    "name": "instance",
                    "label": "Dispatcher",
                    "description": "The dispatcher's scrape target (instance label); All for every cluster.",
                    "type": "query",
                    "datasource": DS,
                    "query": {
                        "query": "label_values(arvados_dispatchcloud_max_concurrent_containers, instance)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "hide": 0,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "sort": 1,
                    "options": [],
                },
            ]
        },
        "panels": layout(items),
    }


def cost_per_container():
    return panel(
        "Cost per finished container",
        "Instance spend divided by containers finished, over the rate interval: what one container costs, idle time included.",
        [(f"sum(rate({dc('instances_cost_total')}[{RI}])) / (sum(rate({dc('containers_finished_total')}[{RI}])) > 0)", "cost per container")],
        unit="currencyUSD", decimals=4, w=8,
    )


OVERVIEW = [
    row("Containers"),
    panel("Containers by state",
          "Containers the dispatcher is handling (queue_entries), by Arvados state.",
          [(f"sum by (state) ({dc('queue_entries')})", "{{state}}")], stack=True, w=8),
    panel("Containers by instance type",
          "Queued, locked and running containers by the cheapest instance type that fits them.",
          [(f"sum by (instance_type) ({dc('queue_entries')})", "{{instance_type}}")], stack=True, w=8),
    panel("Longest wait",
          "The longest time any container has waited since it was queued, before crunch-run started.",
          [(f"max({dc('containers_longest_wait_time_seconds')})", "longest wait")], unit="s", w=8),
    panel("Containers started and finished per minute",
          "crunch-run starts (from the queue-to-crunch-run summary's count) and containers reaching Complete or Cancelled.",
          [(f"sum(rate({dc('containers_time_from_queue_to_crunch_run_seconds_count')}[{RI}])) * 60", "started"),
           (f"sum by (state) (rate({dc('containers_finished_total')}[{RI}])) * 60", "finished {{state}}")],
          unit="short", w=8),
    panel("Concurrency and quota",
          "Containers running on VMs against the dynamic limit set after API 503s; at-quota flag and containers held back by it.",
          [(f"sum({dc('containers_running')})", "running"),
           (f"max({dc('max_concurrent_containers')})", "max concurrent (0: no limit)"),
           (f"max({dc('at_quota')})", "at quota"),
           (f"sum({dc('containers_not_allocated_over_quota')})", "not allocated (over quota)"),
           (f"sum({dc('containers_allocated_not_started')})", "allocated, VM booting")],
          w=8),
    panel("Queue to crunch-run",
          "Seconds from a container being queued to crunch-run starting, quantiles over the last 10 minutes.",
          [(f"max by (quantile) ({dc('containers_time_from_queue_to_crunch_run_seconds', Q_50_95_99)})", "p{{quantile}}")],
          unit="s", w=8),
    row("Instances"),
    panel("Instances by state",
          "Cloud VMs by category: inuse (running containers), idle (includes shutting down), booting, hold, unknown.",
          [(f"sum by (category) ({dc('instances_total')})", "{{category}}")], stack=True, w=8),
    panel("Instances by type",
          "Cloud VMs by instance type.",
          [(f"sum by (instance_type) ({dc('instances_total')}) > 0", "{{instance_type}}")], stack=True, w=8),
    panel("Spend now",
          "What the VMs that exist now cost per hour (InstanceTypes Price), by category.",
          [(f"sum by (category) ({dc('instances_price')})", "{{category}}")],
          unit="currencyUSD", stack=True, w=8),
    panel("Boot time",
          "Seconds from create to first SSH connection, and from first SSH to ready for containers (quantiles over 10 minutes).",
          [(f"max by (quantile) ({dc('instances_time_to_ssh_seconds', Q_50_95)})", "to SSH p{{quantile}}"),
           (f"max by (quantile) ({dc('instances_time_to_ready_for_container_seconds', Q_50_95)})", "to ready p{{quantile}}")],
          unit="s", w=8),
    panel("Boot outcomes",
          "How boots ended: success, failure (boot probe or broken), aborted (shut down first), disappeared.",
          [(f"sum by (outcome) (increase({dc('boot_outcomes')}[{RI}]))", "{{outcome}}")],
          stack=True, w=8),
    panel("Broken and disappeared instances",
          "VMs crunch-run reported broken, and VMs that vanished from the cloud's list, by the state they were in.",
          [(f"sum(increase({dc('instances_broken_total')}[{RI}]))", "broken"),
           (f"sum by (state) (increase({dc('instances_disappeared')}[{RI}]))", "disappeared while {{state}}")],
          w=8),
    panel("Oldest instance per state",
          "How long the oldest VM has been booting, unknown or shutting down: a rising line is a stuck VM.",
          [(f"max by (state) ({dc('instances_state_age_seconds_max')})", "{{state}}")], unit="s", w=8),
    panel("SSH probes",
          "Run probes (crunch-run --list over SSH) per second by outcome, and seconds since the last successful probe.",
          [(f"sum by (outcome) (rate({dc('instances_run_probe_duration_seconds_count')}[{RI}]))", "probes/s {{outcome}}"),
           (f"max({dc('probe_age_seconds_max')})", "probe age max"),
           (f"max({dc('probe_age_seconds_median')})", "probe age median")],
          w=8),
    cost_per_container(),
    row("Cloud and Arvados API"),
    panel("Cloud API calls",
          "Create, List, Destroy and SetTags calls per second, and the share that failed.",
          [(f"sum by (operation) (rate({dc('driver_operations')}[{RI}]))", "{{operation}}"),
           (f"sum by (operation) (rate({dc('driver_operations', FAILED)}[{RI}])) / (sum by (operation) (rate({dc('driver_operations')}[{RI}])) > 0)", "{{operation}} error ratio")],
          w=8),
    panel("Cloud API errors by kind",
          "Failed cloud calls per second by operation and kind: rate_limit, quota, capacity, outcome_unknown (timeouts), other.",
          [(f"sum by (operation, kind) (rate({dc('driver_errors_total')}[{RI}])) > 0", "{{operation}} {{kind}}")],
          stack=True, w=8),
    panel("Arvados API 503s",
          "503 answers from the Arvados API (each moves last_503_time) and the container limit they set.",
          [(f"sum(changes({dc('last_503_time')}[{RI}]))", "503s"),
           (f"max({dc('max_concurrent_containers')})", "max concurrent containers")],
          w=8),
    panel("Scheduling pass duration",
          "Seconds per scheduling pass (plan, lock/start/unlock, sync).",
          [(f"histogram_quantile(0.5, sum by (le) (rate({dc('scheduling_pass_duration_seconds_bucket')}[{RI}])))", "p50"),
           (f"histogram_quantile(0.99, sum by (le) (rate({dc('scheduling_pass_duration_seconds_bucket')}[{RI}])))", "p99")],
          unit="s", w=8),
    panel("Management API requests",
          "Requests per second to the management API and /metrics, by status code.",
          [(f"sum by (code) (rate({dc('request_duration_seconds_count')}[{RI}]))", "{{code}}")],
          unit="reqps", w=8),
    panel("Management API latency",
          "Request duration quantiles over the last 10 minutes, by method.",
          [(f"max by (method, quantile) ({dc('request_duration_seconds', Q_50_99)})", "{{method}} p{{quantile}}")],
          unit="s", w=8),
]

COST = [
    row("Spend"),
    panel("Spend now",
          "What the VMs that exist now cost per hour.",
          [(f"sum({dc('instances_price')})", "per hour")], kind="stat", unit="currencyUSD", w=6, h=5),
    panel("Spend in range",
          "What VMs cost over the dashboard's time range.",
          [(f"sum(increase({dc('instances_cost_total')}[$__range]))", "spend")],
          kind="stat", unit="currencyUSD", w=6, h=5),
    panel("Idle share",
          "Share of instance time with no container (idle, shutting down, booting or held) over the time range.",
          [(f"sum(increase({dc('instances_seconds_total', NOT_INUSE)}[$__range])) / sum(increase({dc('instances_seconds_total')}[$__range]))", "idle share")],
          kind="stat", unit="percentunit", w=6, h=5),
    panel("Containers finished in range",
          "Containers that reached Complete or Cancelled over the time range.",
          [(f"sum by (state) (increase({dc('containers_finished_total')}[$__range]))", "{{state}}")],
          kind="stat", w=6, h=5),
    panel("Spend per hour by type",
          "Spend rate per instance type, from the cumulative cost counter.",
          [(f"sum by (instance_type) (rate({dc('instances_cost_total')}[{RI}])) * 3600 > 0", "{{instance_type}}")],
          unit="currencyUSD", stack=True, w=12),
    panel("Spend per hour: busy vs idle",
          "Spend rate split into VMs running containers (inuse) and everything else.",
          [(f"sum by (category) (rate({dc('instances_cost_total')}[{RI}])) * 3600", "{{category}}")],
          unit="currencyUSD", stack=True, w=12),
    row("Instance time"),
    panel("Instance-hours in range by category",
          "Idle vs busy instance-hours over the time range.",
          [(f"sum by (category) (increase({dc('instances_seconds_total')}[$__range])) / 3600", "{{category}}")],
          kind="bargauge", unit="h", w=8),
    panel("Instance-hours in range by type",
          "Instance-hours per type over the time range.",
          [(f"sum by (instance_type) (increase({dc('instances_seconds_total')}[$__range])) / 3600 > 0", "{{instance_type}}")],
          kind="bargauge", unit="h", w=8),
    cost_per_container(),
    row("Capacity"),
    panel("Spot vs on-demand instances",
          "Average number of VMs over the rate interval, preemptible (spot) or not.",
          [(f"sum by (preemptible) (rate({dc('instances_seconds_total')}[{RI}]))", "preemptible={{preemptible}}")],
          stack=True, w=8),
    panel("Spot vs on-demand spend per hour",
          "Spend rate of preemptible (spot) and on-demand VMs.",
          [(f"sum by (preemptible) (rate({dc('instances_cost_total')}[{RI}])) * 3600", "preemptible={{preemptible}}")],
          unit="currencyUSD", stack=True, w=8),
    panel("Held off by quota or capacity",
          "The at-quota flag, containers not allocated because of it, and create calls refused for quota or capacity.",
          [(f"max({dc('at_quota')})", "at quota"),
           (f"sum({dc('containers_not_allocated_over_quota')})", "containers over quota"),
           (f"sum by (kind) (rate({dc('driver_errors_total', CREATE_REFUSED)}[{RI}])) * 60", "create refused/min: {{kind}}")],
          w=8),
    panel("VCPUs by category",
          "VCPUs of all VMs, by category.",
          [(f"sum by (category) ({dc('vcpus_total')})", "{{category}}")], stack=True, w=12),
    panel("Memory by category",
          "Memory of all VMs, by category.",
          [(f"sum by (category) ({dc('memory_bytes_total')})", "{{category}}")],
          unit="bytes", stack=True, w=12),
]

BOARDS = {
    "overview.json": dashboard(
        "arvados-dispatch-cloud-overview",
        "Arvados dispatch-cloud: overview",
        "Containers, instances, cloud and API health of arvados-dispatch-cloud.",
        OVERVIEW,
    ),
    "cost-capacity.json": dashboard(
        "arvados-dispatch-cloud-cost",
        "Arvados dispatch-cloud: cost and capacity",
        "What the cloud VMs cost, how much of it is idle, spot vs on-demand, and quota or capacity hold-offs.",
        COST,
    ),
}


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, board in BOARDS.items():
        text = json.dumps(board, indent=2, ensure_ascii=False) + "\n"
        path = os.path.join(HERE, name)
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python3 dashboards/build.py", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
