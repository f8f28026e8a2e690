"""Measurements of bench/million.sh (see there). Prints markdown table rows.

  million.py ready NAME PID PORT T0_FILE
  million.py changes DATABASE_URL USERS REPS FLOW_B PID_A PID_B PORT_B METRICS_B DB
"""
import http.client
import os
import random
import statistics
import subprocess
import sys
import time


def rss_mb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Http:
    def __init__(self, port):
        self.port = port
        self.conn = None

    def get(self, path, token=None):
        for _ in range(3):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                self.conn.request("GET", path, headers=headers)
                r = self.conn.getresponse()
                body = r.read()
                return r.status, body
            except (OSError, http.client.HTTPException):
                self.conn = None
                time.sleep(0.01)
        return 0, b""


def ready(name, pid, port, t0_file):
    t0 = float(open(t0_file).read())
    h = Http(int(port))
    deadline = time.time() + 180
    while time.time() < deadline:
        status, _ = h.get("/health")
        if status == 200:
            dt = time.time() - t0
            print(f"| {name}: ready (GET /health 200) after spawn | {dt:.2f} s |")
            print(f"| {name}: RSS when ready | {rss_mb(int(pid)):.0f} MB |")
            return 0
        time.sleep(0.01)
    return 1


class Psql:
    """One psql session: a statement's commit is acknowledged when its
    marker line comes back."""

    def __init__(self, url):
        self.p = subprocess.Popen(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, sql):
        self.p.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo __done__\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.p.stdout.readline()
            if line == "":
                raise RuntimeError("psql exited")
            line = line.rstrip("\n")
            if line == "__done__":
                return out
            if line:
                out.append(line)


def metrics(port):
    h = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h.request("GET", "/metrics")
    text = h.getresponse().read().decode()
    h.close()
    vals = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        k, v = line.rsplit(" ", 1)
        try:
            vals[k] = float(v)
        except ValueError:
            pass
    return vals


def metric(vals, prefix):
    return sum(v for k, v in vals.items() if k.split("{")[0] == prefix.split("{")[0]
               and (("{" not in prefix) or prefix.split("{", 1)[1].rstrip("}") in k))


def snapshot_updates(port):
    m = metrics(port)
    return (metric(m, "flowise_proxy_identity_snapshot_deltas_total")
            + metric(m, "flowise_proxy_identity_snapshot_reloads_total"))


def token(i):
    return f"fpk_{i:012x}_s{i}"


def wait_status(h, path, tok, want, limit=30.0):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if h.get(path, tok)[0] == want:
            return time.perf_counter()
        time.sleep(0.001)
    return None


def summary(xs):
    ok = [x for x in xs if x is not None]
    if not ok:
        return "never (30 s)"
    s = f"median {statistics.median(ok) * 1000:.0f} ms, max {max(ok) * 1000:.0f} ms (n={len(ok)})"
    if len(ok) < len(xs):
        s += f", {len(xs) - len(ok)} not within 30 s"
    return s


def changes(url, users, reps, flow_b, pid_a, pid_b, port_b, met_b, db):
    users, reps, port_b, met_b = int(users), int(reps), int(port_b), int(met_b)
    sql = Psql(url)
    h = Http(port_b)
    rnd = random.Random(7)
    picks = rnd.sample(range(1, users + 1), 3 * reps)
    grants, revokes, keys, first_ok = [], [], [], 0
    for r in range(reps):
        u = picks[3 * r]
        # B knows the user and its key; the chatflow is not granted yet.
        assert h.get(f"/chatflows/{flow_b}", token(u))[0] == 403, "precondition: 403"
        sql.run(f"INSERT INTO grants (user_id, chatflow_id) VALUES ({u}, '{flow_b}')")
        t0 = time.perf_counter()
        t1 = wait_status(h, f"/chatflows/{flow_b}", token(u), 200)
        grants.append(None if t1 is None else t1 - t0)

        u = picks[3 * r + 1]
        sql.run(f"UPDATE api_keys SET revoked_at = now() WHERE prefix = '{u:012x}'")
        t0 = time.perf_counter()
        t1 = wait_status(h, f"/chatflows/{flow_b}", token(u), 401)
        revokes.append(None if t1 is None else t1 - t0)

        u = picks[3 * r + 2]
        prefix = f"n{r:011x}"
        before = snapshot_updates(met_b)
        sql.run(f"INSERT INTO api_keys (user_id, prefix, secret_hash) VALUES "
                f"({u}, '{prefix}', sha256(convert_to('new{r}', 'UTF8')))")
        t0 = time.perf_counter()
        if h.get("/chatflows/" + flow_b, f"fpk_{prefix}_new{r}")[0] == 403:
            first_ok += 1  # authenticated (not 401); the chatflow is not granted
        t1 = None
        while time.perf_counter() - t0 < 30:
            if snapshot_updates(met_b) > before:
                t1 = time.perf_counter()
                break
            time.sleep(0.001)
        keys.append(None if t1 is None else t1 - t0)
        time.sleep(0.2)  # let both instances settle before the next round

    print(f"| grant committed → enforced on B | {summary(grants)} |")
    print(f"| API key revoked → refused on B | {summary(revokes)} |")
    print(f"| API key created → in B's snapshot | {summary(keys)} |")
    print(f"| API key created → works on B's first request | {first_ok}/{reps} |")

    # Database cost of one change: rows PostgreSQL returned or fetched for
    # this database (every session: both instances, this psql) over a window
    # with N grant changes, minus an idle window of the same length, over N.
    n = int(os.environ.get("COST_CHANGES", "50"))
    pace = float(os.environ.get("COST_PACE_S", "0.1"))

    def rows():
        time.sleep(2.5)  # backends flush their statistics at most once a second
        out = sql.run(f"SELECT pg_stat_clear_snapshot(); SELECT tup_returned + tup_fetched "
                      f"FROM pg_stat_database WHERE datname = '{db}'")
        return int(out[-1])

    def b_rows():
        m = metrics(met_b)
        return (metric(m, 'flowise_proxy_identity_snapshot_rows_read_total{kind="full"}'),
                metric(m, 'flowise_proxy_identity_snapshot_rows_read_total{kind="delta"}'))

    r0 = rows()
    time.sleep(n * pace)
    r1 = rows()
    idle = r1 - r0
    b0 = b_rows()
    start = time.perf_counter()
    late = 0
    for i in range(n):
        u = picks[i % reps * 3]  # granted above: take the grant back, then give it again
        if i < reps:
            sql.run(f"DELETE FROM grants WHERE user_id = {u} AND chatflow_id = '{flow_b}'")
            if wait_status(h, f"/chatflows/{flow_b}", token(u), 403, 5.0) is None:
                late += 1
        else:
            v = picks[i] if i < len(picks) else rnd.randrange(1, users + 1)
            sql.run(f"INSERT INTO grants (user_id, chatflow_id) VALUES ({v}, '{flow_b}') "
                    f"ON CONFLICT DO NOTHING")
        time.sleep(max(0.0, start + (i + 1) * pace - time.perf_counter()))
    r2 = rows()
    b1 = b_rows()
    per = (r2 - r1 - idle) / n
    print(f"| DB rows returned+fetched per grant change, all sessions ({n} changes in "
          f"{n * pace:.0f} s + 2.5 s, minus an idle window of the same length: "
          f"{r2 - r1} - {idle}) | {per:,.0f} |")
    if late:
        print(f"| of those, not enforced on B within 5 s | {late} |")
    print(f"| rows B read per change: full / delta | {(b1[0] - b0[0]) / n:,.1f} / "
          f"{(b1[1] - b0[1]) / n:,.1f} |")
    for name, pid in (("A", int(pid_a)), ("B", int(pid_b))):
        print(f"| {name}: RSS after the changes / peak (VmHWM) | "
              f"{rss_mb(pid):.0f} MB / {rss_mb(pid, 'VmHWM'):.0f} MB |")

    # A lost LISTEN connection: both instances reload everything.
    before = metric(metrics(met_b), "flowise_proxy_identity_snapshot_reloads_total")
    sql.run("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{db}' AND application_name = 'flowise-proxy-listen'")
    t0 = time.perf_counter()
    t1 = None
    while time.perf_counter() - t0 < 60:
        if metric(metrics(met_b), "flowise_proxy_identity_snapshot_reloads_total") > before:
            t1 = time.perf_counter()
            break
        time.sleep(0.01)
    took = "never (60 s)" if t1 is None else f"{t1 - t0:.2f} s"
    print(f"| B: LISTEN connection killed → full reload installed | {took} |")
    time.sleep(3)  # the previous tables are handed back 1 s after the install
    for name, pid in (("A", int(pid_a)), ("B", int(pid_b))):
        print(f"| {name}: RSS 3 s after that reload / peak (VmHWM) | "
              f"{rss_mb(pid):.0f} MB / {rss_mb(pid, 'VmHWM'):.0f} MB |")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "ready":
        sys.exit(ready(*sys.argv[2:]))
    elif mode == "changes":
        changes(*sys.argv[2:])
