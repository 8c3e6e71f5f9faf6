"""Generate sigtrace's Grafana dashboards with grafana-foundation-sdk.

Run ``python -m grafana.generate`` (or ``make dashboards``) to rewrite the JSON
under ``grafana/dashboards/``; ``--check`` only reports whether the committed
files are up to date. The JSON is committed so that Grafana's file provisioning
(``grafana/provisioning/dashboards``) can load it without Python.

It also fills in the alert rules' ``runbook_url`` annotations (in
``grafana/rules/sigtrace-alerts.yml`` and the expectations of its promtool
tests) from one setting: ``--runbook-url``, else the ``RUNBOOK_URL``
environment variable, else :data:`DEFAULT_RUNBOOK_URL`. It is the absolute
http(s) URL where your alert receivers can open ``grafana/rules/RUNBOOK.md``;
each alert links to its section (``<url>#<alert name in lower case>``).

Every query filters on the ``$job`` and ``$instance`` variables (regex matchers,
so "All" is ``.*``) and uses ``$__rate_interval``, which Grafana keeps at least
four scrape intervals wide. Every query drops the series without traffic in
that interval (rates ``> 0``; quantiles, ratios and heatmaps only where the
count's rate is above zero), so a quiet signal or endpoint is not drawn and no
panel shows NaN (``histogram_quantile`` of empty buckets, 0/0).

Latency panels ask for exemplars: Prometheus stores the ``trace_id`` that
sigtrace attaches to histogram observations, and the datasource's
``exemplarTraceIdDestinations`` turns each one into a Tempo link.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import typing as t
import urllib.parse
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard as dashboard_builder
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dashboard_model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

__all__ = [
    "DASHBOARDS_DIR",
    "DEFAULT_RUNBOOK_URL",
    "RULES_DIR",
    "dashboards",
    "main",
    "render",
    "rules_with_runbook",
    "runbook_url",
]

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
RULES_DIR = Path(__file__).resolve().parent / "rules"

RUNBOOK_URL_VARIABLE = "RUNBOOK_URL"
DEFAULT_RUNBOOK_URL = "https://runbooks.example.com/sigtrace/RUNBOOK.md"
"""Where the committed rules point: a placeholder to replace with the address of
your copy of ``grafana/rules/RUNBOOK.md`` (a wiki page, your repository's file)."""

RUNBOOK_FILES = (
    "sigtrace-alerts.yml",
    "tests/sigtrace-http.test.yml",
    "tests/sigtrace-multiprocess.test.yml",
    "tests/sigtrace-receivers.test.yml",
)
"""The files under :data:`RULES_DIR` whose ``runbook_url`` lines are filled in."""

_RUNBOOK_LINE = re.compile(r"^(?P<key>[ \t]*runbook_url: ).*#(?P<anchor>[a-z0-9-]+)[ \t]*$", re.M)

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TARGET = 'job=~"$job", instance=~"$instance"'
SIGNAL = f'{TARGET}, signal=~"$signal"'
RECEIVER = f'{SIGNAL}, receiver=~"$receiver"'

HTTP = "sigtrace_http_request_duration_seconds"
HTTP_EXCEPTIONS = "sigtrace_http_request_exceptions_total"
SENDS = "sigtrace_signal_sends_total"
SIGNAL_DURATION = "sigtrace_signal_duration_seconds"
RECEIVER_DURATION = "sigtrace_receiver_duration_seconds"
RECEIVER_ERRORS = "sigtrace_receiver_errors_total"

TOP_RECEIVERS = 10
"""How many receivers the "slowest receivers" panel keeps at each step."""


def rate(selector: str, by: str = "") -> str:
    """``sum [by (...)] (rate(selector[$__rate_interval]))``."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({selector}[{RATE}]))"


def active(selector: str, by: str = "") -> str:
    """:func:`rate`, keeping only the groups with traffic (rate above zero)."""
    return f"{rate(selector, by)} > 0"


def with_traffic(expr: str, counter: str, by: str = "") -> str:
    """``expr``, only for the ``by`` groups whose ``counter`` rate is above zero
    (a quantile of empty buckets, or a ratio over no calls, is NaN)."""
    return f"{expr} and on ({by}) ({active(counter, by)})"


def quantile(q: float, metric: str, matchers: str, by: str) -> str:
    """The ``q`` quantile of a histogram per ``by`` group, groups with traffic only."""
    buckets = rate(f"{metric}_bucket{{{matchers}}}", f"le, {by}" if by else "le")
    return with_traffic(f"histogram_quantile({q}, {buckets})", f"{metric}_count{{{matchers}}}", by)


def ratio(numerator: str, denominator: str, by: str = "") -> str:
    """``rate(numerator) / rate(denominator)``, where the denominator has traffic."""
    return f"{rate(numerator, by)} / ({active(denominator, by)})"


def query(ref_id: str, expr: str, legend: str, *, exemplar: bool = False) -> prometheus.Dataquery:
    target = prometheus.Dataquery().ref_id(ref_id).expr(expr).legend_format(legend).range()
    if exemplar:
        target = target.exemplar(True)
    return target


def legend() -> common_builder.VizLegendOptions:
    return (
        common_builder.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(["mean", "max"])
        .sort_by("Max")
        .sort_desc(True)
    )


def graph(
    title: str, description: str, unit: str, targets: list[prometheus.Dataquery], width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .legend(legend())
        .tooltip(
            common_builder.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def single_stat(title: str, description: str, unit: str, expr: str) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(4)
        .no_value("0")  # no matching series means none of it happened
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(query("A", expr, ""))
    )


def latency_heatmap(title: str, description: str, metric: str, matchers: str) -> heatmap.Panel:
    buckets = with_traffic(
        rate(f"{metric}_bucket{{{matchers}}}", "le"), f"{metric}_count{{{matchers}}}"
    )
    target = query("A", buckets, "{{le}}", exemplar=True).format(PromQueryFormat.HEATMAP)
    return (
        heatmap.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .calculate(False)  # the buckets come from Prometheus already
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_model.HeatmapColorMode.SCHEME)
            .scheme("Spectral")
            .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)  # Grafana's default; the SDK would write 0, a flat scale
            .fill("dark-orange")
            .steps(64)
        )
        .exemplars_color("rgba(255,0,255,0.7)")
        .show_tooltip()
        .show_legend()
        .with_target(target)
    )


def variable(
    name: str, label: str, metric: str, matchers: str = ""
) -> dashboard_builder.QueryVariable:
    selector = f"{metric}{{{matchers}}}" if matchers else metric
    return (
        dashboard_builder.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({selector}, {name})")
        .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")  # every query uses =~, so "All" matches any value
        .current(dashboard_model.VariableOption(selected=True, text="All", value="$__all"))
    )


def base(uid: str, title: str, description: str) -> dashboard_builder.Dashboard:
    return (
        dashboard_builder.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["sigtrace", "flask", "blinker"])
        .editable()
        .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
        .time("now-30m", "now")
        .refresh("10s")
        .timezone("browser")
        .link(
            dashboard_builder.DashboardLink("sigtrace")
            .type(dashboard_model.DashboardLinkType.DASHBOARDS)
            .tags(["sigtrace"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(
            dashboard_builder.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
        )
        .with_variable(variable("job", "Job", f"{HTTP}_count"))
        .with_variable(variable("instance", "Instance", f"{HTTP}_count", 'job=~"$job"'))
    )


def requests_dashboard() -> dashboard_builder.Dashboard:
    """Requests as Flask's signals see them: rate, errors, latency, exceptions."""
    count = f"{HTTP}_count"
    server_errors = f'{count}{{{TARGET}, status=~"5.."}}'
    return (
        base(
            "sigtrace-requests",
            "Sigtrace / HTTP requests",
            "Flask requests timed from the app's WSGI call to its answer, and the "
            "unhandled exceptions reported by got_request_exception.",
        )
        .with_row(dashboard_builder.Row("Overview"))
        .with_panel(
            single_stat("Requests/s", "All endpoints.", "reqps", active(f"{count}{{{TARGET}}}"))
        )
        .with_panel(
            single_stat(
                "5xx ratio",
                "Share of requests answered with a 5xx status.",
                "percentunit",
                ratio(server_errors, f"{count}{{{TARGET}}}"),
            )
        )
        .with_panel(
            single_stat(
                "Unhandled exceptions/s",
                "got_request_exception: exceptions a view let escape.",
                "ops",
                active(f"{HTTP_EXCEPTIONS}{{{TARGET}}}"),
            )
        )
        .with_panel(
            single_stat(
                "p99 latency",
                "Over all endpoints.",
                "s",
                quantile(0.99, HTTP, TARGET, ""),
            )
        )
        .with_row(dashboard_builder.Row("Traffic and errors"))
        .with_panel(
            graph(
                "Request rate by endpoint",
                "Requests per second, by Flask endpoint.",
                "reqps",
                [query("A", active(f"{count}{{{TARGET}}}", "endpoint"), "{{endpoint}}")],
            )
        )
        .with_panel(
            graph(
                "Error ratio (5xx) by endpoint",
                "Share of each endpoint's requests answered with a 5xx status. Endpoints "
                "without errors are not drawn.",
                "percentunit",
                [
                    query(
                        "A",
                        ratio(server_errors, f"{count}{{{TARGET}}}", "endpoint"),
                        "{{endpoint}}",
                    )
                ],
            )
        )
        .with_panel(
            graph(
                "Unhandled exceptions (got_request_exception)",
                "Exceptions that escaped a view, per second, by endpoint and exception class.",
                "ops",
                [
                    query(
                        "A",
                        active(f"{HTTP_EXCEPTIONS}{{{TARGET}}}", "endpoint, exception"),
                        "{{endpoint}} {{exception}}",
                    )
                ],
                width=24,
            )
        )
        .with_row(dashboard_builder.Row("Latency"))
        .with_panel(
            graph(
                "Latency by endpoint (p50, p95, p99)",
                "Request duration quantiles. Exemplar dots link to the request's trace.",
                "s",
                [
                    query(
                        ref,
                        quantile(q, HTTP, TARGET, "endpoint"),
                        f"p{pct} {{{{endpoint}}}}",
                        exemplar=True,
                    )
                    for ref, q, pct in (("A", 0.5, 50), ("B", 0.95, 95), ("C", 0.99, 99))
                ],
            )
        )
        .with_panel(
            latency_heatmap(
                "Request latency heatmap",
                "All requests' durations; exemplars link to traces.",
                HTTP,
                TARGET,
            )
        )
    )


def signals_dashboard() -> dashboard_builder.Dashboard:
    """Blinker signals and their receivers: sends, latency, errors."""
    calls = f"{RECEIVER_DURATION}_count{{{RECEIVER}}}"
    return (
        base(
            "sigtrace-signals",
            "Sigtrace / Signals and receivers",
            "Every blinker Signal.send in the process: sends per signal, and each "
            "receiver's latency and errors.",
        )
        .with_variable(variable("signal", "Signal", SENDS, TARGET))
        .with_variable(variable("receiver", "Receiver", f"{RECEIVER_DURATION}_count", SIGNAL))
        .with_row(dashboard_builder.Row("Signals"))
        .with_panel(
            graph(
                "Signal send rate by signal",
                "Signal.send / send_async calls per second. Flask's request signals "
                "(request-started, ...) count every request Flask handles, scrapes of the "
                "metrics route and excluded paths included; request rates come from the "
                "HTTP requests dashboard, which leaves those out.",
                "ops",
                [query("A", active(f"{SENDS}{{{SIGNAL}}}", "signal"), "{{signal}}")],
            )
        )
        .with_panel(
            graph(
                "Signal dispatch latency p95 by signal",
                "Time of a whole send, all receivers included.",
                "s",
                [
                    query(
                        "A",
                        quantile(0.95, SIGNAL_DURATION, SIGNAL, "signal"),
                        "p95 {{signal}}",
                        exemplar=True,
                    )
                ],
            )
        )
        .with_row(dashboard_builder.Row("Receivers"))
        .with_panel(
            graph(
                f"Slowest receivers p95 / p99 (top {TOP_RECEIVERS})",
                "Receiver latency quantiles, the slowest receivers at each step. Exemplar "
                "dots link to the trace of a send.",
                "s",
                [
                    query(
                        ref,
                        f"topk({TOP_RECEIVERS}, "
                        f"{quantile(q, RECEIVER_DURATION, RECEIVER, 'signal, receiver')})",
                        f"p{pct} {{{{receiver}}}} ({{{{signal}}}})",
                        exemplar=True,
                    )
                    for ref, q, pct in (("A", 0.95, 95), ("B", 0.99, 99))
                ],
            )
        )
        .with_panel(
            latency_heatmap(
                "Receiver latency heatmap",
                "Durations of the selected receivers; exemplars link to traces.",
                RECEIVER_DURATION,
                RECEIVER,
            )
        )
        .with_panel(
            graph(
                "Receiver error rate",
                "Exceptions raised by receivers per second, by receiver and exception class.",
                "ops",
                [
                    query(
                        "A",
                        active(f"{RECEIVER_ERRORS}{{{RECEIVER}}}", "signal, receiver, exception"),
                        "{{receiver}} {{exception}}",
                    )
                ],
            )
        )
        .with_panel(
            graph(
                "Receiver error ratio",
                "Share of each receiver's calls that raised.",
                "percentunit",
                [
                    query(
                        "A",
                        ratio(f"{RECEIVER_ERRORS}{{{RECEIVER}}}", calls, "signal, receiver"),
                        "{{receiver}} ({{signal}})",
                    )
                ],
            )
        )
        .with_panel(
            graph(
                "Receiver call rate",
                "Receiver calls per second.",
                "ops",
                [query("A", active(calls, "signal, receiver"), "{{receiver}} ({{signal}})")],
                width=24,
            )
        )
    )


def dashboards() -> dict[str, dict[str, t.Any]]:
    """Every dashboard as JSON-ready data, by file name."""
    built = {
        "sigtrace-requests.json": requests_dashboard(),
        "sigtrace-signals.json": signals_dashboard(),
    }
    return {name: _number_panels(_plain(board.build())) for name, board in built.items()}


def _plain(model: object) -> dict[str, t.Any]:
    data: dict[str, t.Any] = json.loads(json.dumps(model, cls=JSONEncoder))
    return data


def _number_panels(board: dict[str, t.Any]) -> dict[str, t.Any]:
    # The SDK leaves every id at 0; Grafana needs them unique within a dashboard.
    for number, panel in enumerate(board.get("panels", []), start=1):
        panel["id"] = number
    return board


def render(board: dict[str, t.Any]) -> str:
    """The committed form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(board, indent=2, sort_keys=True) + "\n"


def runbook_url(value: str) -> str:
    """``value`` if it is an absolute http(s) URL with a host and no fragment."""
    url = urllib.parse.urlsplit(value.strip())
    if url.scheme not in ("http", "https") or not url.netloc or url.fragment or " " in value:
        raise ValueError(
            f"{RUNBOOK_URL_VARIABLE}={value!r} is invalid: expected an absolute http:// or "
            "https:// URL of RUNBOOK.md, without a '#' (each alert adds its own)"
        )
    return value.strip()


def rules_with_runbook(rules_dir: Path, url: str) -> dict[str, str]:
    """Each of :data:`RUNBOOK_FILES` with its ``runbook_url`` lines set to
    ``<url>#<anchor>`` (the anchor each line already has)."""
    return {
        name: _RUNBOOK_LINE.sub(
            lambda m: f"{m.group('key')}{url}#{m.group('anchor')}",
            (rules_dir / name).read_text(encoding="utf-8"),
        )
        for name in RUNBOOK_FILES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grafana.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="output directory")
    parser.add_argument(
        "--rules-dir", type=Path, default=RULES_DIR, help="rules directory to fill in"
    )
    parser.add_argument(
        "--runbook-url",
        default=os.environ.get(RUNBOOK_URL_VARIABLE) or DEFAULT_RUNBOOK_URL,
        help=f"absolute URL of RUNBOOK.md (default: ${RUNBOOK_URL_VARIABLE}, else "
        f"{DEFAULT_RUNBOOK_URL})",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a file differs from the generator's output"
    )
    args = parser.parse_args(argv)
    try:
        url = runbook_url(args.runbook_url)
    except ValueError as error:
        parser.error(str(error))
    outputs = {args.out / name: render(board) for name, board in dashboards().items()}
    outputs |= {
        args.rules_dir / name: text
        for name, text in rules_with_runbook(args.rules_dir, url).items()
    }
    stale = []
    for path, text in outputs.items():
        name = path.name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)} (run: python -m grafana.generate)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
