#!/usr/bin/env python3
"""Turns bench/run.sh's per-run lines into one markdown table.

    python3 bench/table.py RESULTS [--machine M] [--commit C] [--setup S]

Each input line is `key=value` pairs: rep, scenario, server, requests, secs,
req_per_s, p99_ms, errors (socket errors: connect + read + write + timeout),
non2xx, server_ticks, pg_ticks (CPU clock ticks during the run) and hz.

Per scenario and server: req/s and p99 are the medians over the repetitions;
socket errors and non-2xx are summed; CPU per request is the CPU time of all
repetitions divided by all their requests. The ratios compare with nginx in
the same scenario (for predict-hot, nginx's predict-many: nginx debits
nothing, so one user or many is the same path for it).
"""

import argparse
import statistics
import sys
from collections import OrderedDict

SCENARIOS = OrderedDict(
    [
        ("ping", "pass-through `GET /api/v1/ping`"),
        ("chatflow", "authenticated `GET /api/v1/chatflows/{id}`"),
        ("predict-many", "debited JSON prediction, 1000 users"),
        ("predict-hot", "debited JSON prediction, one hot user"),
        ("burst", "burst streams (streams/s)"),
        ("spaced", "spaced streams"),
    ]
)
SERVER_ORDER = ["nginx", "bare", "proxy"]
SERVER_NAMES = {"nginx": "nginx", "bare": "bare Pingora", "proxy": "flowise-proxy"}
REFERENCE = {"predict-hot": "predict-many"}


def parse(path):
    runs = []
    with open(path) as f:
        for line in f:
            fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
            if "scenario" in fields:
                runs.append(fields)
    return runs


def settle_times(path):
    """scenario -> the settlement waits (ms) after flowise-proxy's runs."""
    out = OrderedDict()
    for r in parse(path):
        if "settle_ms" in r:
            out.setdefault(r["scenario"], []).append(int(r["settle_ms"]))
    return out


def summarize(runs):
    groups = OrderedDict()
    for r in runs:
        groups.setdefault((r["scenario"], r["server"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        hz = float(rs[0]["hz"])
        requests = sum(int(r["requests"]) for r in rs)
        server_s = sum(int(r["server_ticks"]) for r in rs) / hz
        pg_s = sum(int(r["pg_ticks"]) for r in rs) / hz
        out[key] = {
            "reps": len(rs),
            "rps": statistics.median(float(r["req_per_s"]) for r in rs),
            "rps_all": [float(r["req_per_s"]) for r in rs],
            "p50": statistics.median(float(r["p50_ms"]) for r in rs),
            "p99": statistics.median(float(r["p99_ms"]) for r in rs),
            "p999": statistics.median(float(r.get("p999_ms", "nan")) for r in rs),
            "rate": rs[0].get("rate", ""),
            "errors": sum(int(r["errors"]) for r in rs),
            "non2xx": sum(int(r["non2xx"]) for r in rs),
            "requests": requests,
            "cpu_us": server_s * 1e6 / requests if requests else float("nan"),
            "pg_us": pg_s * 1e6 / requests if requests else float("nan"),
        }
    return out


def fmt_int(x):
    return f"{x:,.0f}"


def fmt_us(x):
    return "–" if x != x else f"{x:,.1f}"


def ratio(a, b):
    if not b or a != a or b != b:
        return "–"
    return f"{a / b:.2f}×"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--machine", default="")
    ap.add_argument("--commit", default="")
    ap.add_argument("--setup", default="")
    a = ap.parse_args()
    s = summarize(parse(a.results))
    if not s:
        sys.exit("table.py: no results in " + a.results)

    lines = []
    if a.machine:
        lines.append(f"Machine: {a.machine}. Commit: {a.commit}.")
    if a.setup:
        lines.append(f"Setup: {a.setup}.")
    lines.append("")
    lines.append(
        "| scenario | server | req/s (median) | p99 ms | socket errors | non-2xx "
        "| CPU µs/req | PostgreSQL µs/req | req/s ÷ nginx | CPU ÷ nginx |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    scenarios = [k for k in SCENARIOS if any(sc == k for sc, _ in s)]
    scenarios += sorted({sc for sc, _ in s} - set(scenarios) - {"open-loop"})
    for sc in scenarios:
        ref = s.get((REFERENCE.get(sc, sc), "nginx"))
        for server in SERVER_ORDER:
            row = s.get((sc, server))
            if row is None:
                continue
            spread = "–".join(fmt_int(x) for x in (min(row["rps_all"]), max(row["rps_all"])))
            lines.append(
                "| {} | {} | {} ({}) | {:.1f} | {} | {} | {} | {} | {} | {} |".format(
                    SCENARIOS.get(sc, sc),
                    SERVER_NAMES.get(server, server),
                    fmt_int(row["rps"]),
                    spread,
                    row["p99"],
                    fmt_int(row["errors"]),
                    fmt_int(row["non2xx"]),
                    fmt_us(row["cpu_us"]),
                    fmt_us(row["pg_us"]),
                    "1.00×" if server == "nginx" and ref is row else ratio(row["rps"], ref["rps"] if ref else None),
                    "1.00×" if server == "nginx" and ref is row else ratio(row["cpu_us"], ref["cpu_us"] if ref else None),
                )
            )
    lines.append("")
    lines.append(
        "req/s: median of the repetitions (min–max in brackets); socket errors and "
        "non-2xx: summed over the repetitions; CPU: user + system time of the "
        "server's processes (nginx: master + workers) and of the PostgreSQL "
        "backends serving the benchmark's database, divided by the requests."
    )
    settle = [
        f"{SCENARIOS.get(sc, sc)} {statistics.median(ms) / 1000:.1f} s"
        for sc, ms in settle_times(a.results).items()
    ]
    if settle:
        lines.append("")
        lines.append(
            "flowise-proxy's debit rows include settling: after each timed run the "
            "harness waits until no credits are held before it reads the CPU counters. "
            "That wait (median): " + "; ".join(settle) + "."
        )
    lines += open_loop_table(s)
    print("\n".join(lines))


def open_loop_table(s):
    """Added latency at a fixed rate: each server's p99 minus going direct."""
    direct = s.get(("open-loop", "direct"))
    rows = [(srv, s[("open-loop", srv)]) for srv in ["direct"] + SERVER_ORDER if ("open-loop", srv) in s]
    if not rows:
        return []
    rate = rows[0][1]["rate"]
    lines = [
        "",
        f"Open loop (examples/open_loop.rs: latency from each request's scheduled send time, "
        f"so a stall counts for every request it delays): authenticated `GET /api/v1/ping` at "
        f"{rate} req/s, a quarter of nginx's peak above; medians of {rows[0][1]['reps']} runs.",
        "",
        "| server | p50 ms | p99 ms | p99.9 ms | p99 added over direct | errors | non-2xx | CPU µs/req |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for srv, r in rows:
        added = "–" if srv == "direct" or direct is None else f"{r['p99'] - direct['p99']:+.2f} ms"
        lines.append(
            "| {} | {:.2f} | {:.2f} | {:.2f} | {} | {} | {} | {} |".format(
                "direct to the double" if srv == "direct" else SERVER_NAMES.get(srv, srv),
                r["p50"],
                r["p99"],
                r["p999"],
                added,
                fmt_int(r["errors"]),
                fmt_int(r["non2xx"]),
                fmt_us(r["cpu_us"]),
            )
        )
    return lines


if __name__ == "__main__":
    main()
