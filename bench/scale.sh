#!/usr/bin/env bash
# Benchmark of previewd at a platform's scale: many links over many containers.
#
# Starts the release `previewd serve` (embedded store, local Docker) and $CONTAINERS testapp
# containers (listening on 0.0.0.0:8080), then reports, with baselines from the same run:
#   - create -> serving: a new public link created through the API until its path URL first
#     answers 200 through the proxy, p50 over $SAMPLES links, with no other links present
#     (the baseline) and again with $LINKS links present (the ratio between them);
#   - RSS: previewd's resident memory idle (the baseline), once $LINKS token links (default:
#     one Secret each, `via: auto`, spread over the containers, so one shared injection per
#     container) are all Ready and again 80 s later (the watch history has let the creates
#     go), its peak, and after they are all deleted; the growth against the issue's goal
#     (64 MiB per 10,000 links);
#   - previewd's CPU over those 80 s, with the links Ready and nothing else happening;
#   - how fast the links were created and became Ready.
#
# Usage: bench/scale.sh            (env: LINKS=10000 CONTAINERS=50 SAMPLES=30 WRITERS=8)
# Needs Docker and python3; builds the release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
LINKS=${LINKS:-10000}
CONTAINERS=${CONTAINERS:-50}
SAMPLES=${SAMPLES:-30}
WRITERS=${WRITERS:-8}

cargo build --release --bins --examples -q
BIN=target/x86_64-unknown-linux-gnu/release
WORK=$(mktemp -d)
PREFIX=previewd-scale-$$
cleanup() {
  [ -n "${PREVIEWD_PID:-}" ] && kill "$PREVIEWD_PID" 2>/dev/null && wait "$PREVIEWD_PID" 2>/dev/null || true
  docker ps -aq --filter "name=$PREFIX-" | xargs -r docker rm -f >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The upstreams: the static testapp alone in an imported image.
mkdir -p "$WORK/rootfs/etc" "$WORK/rootfs/tmp"
cp "$BIN/examples/testapp" "$WORK/rootfs/testapp"
echo 'root:x:0:0:root:/:/testapp' > "$WORK/rootfs/etc/passwd"
tar -C "$WORK/rootfs" --owner=0 --group=0 -cf - . | docker import -c 'ENTRYPOINT ["/testapp"]' - previewd-bench/testapp:latest >/dev/null
for i in $(seq 0 $((CONTAINERS - 1))); do
  docker run -d --name "$PREFIX-$i" previewd-bench/testapp:latest 0.0.0.0:8080 >/dev/null
done

API=127.0.0.1:18111 PROXY=127.0.0.1:18112
PREVIEWD_AGENT_BINARY=$BIN/previewd-agent PREVIEWD_PATH_URLS=true RUST_LOG=warn \
  "$BIN/previewd" serve --api-listen $API --proxy-listen $PROXY --state-dir "$WORK/state" \
  2> "$WORK/previewd.log" &
PREVIEWD_PID=$!
for _ in $(seq 300); do curl -sf "http://$API/readyz" >/dev/null && break; sleep 0.1; done

python3 - "$API" "$PROXY" "$PREVIEWD_PID" "$PREFIX" "$CONTAINERS" "$LINKS" "$SAMPLES" "$WRITERS" <<'PY'
import json, os, statistics, sys, time, urllib.error, urllib.request
from concurrent.futures import ThreadPoolExecutor

api, proxy, pid, prefix = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
containers, links, samples, writers = (int(a) for a in sys.argv[5:9])
base = f"http://{api}/apis/previewd.dev/v1alpha1/namespaces/default/previewlinks"


def rss_mib(field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def cpu_s():
    """previewd's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for attempt in range(20):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            if e.code in (404, 409):
                return e.code, e.read()
            if attempt == 19:
                raise
        except OSError:
            if attempt == 19:
                raise
        time.sleep(0.2)


def link(name, container, access="token"):
    return {
        "apiVersion": "previewd.dev/v1alpha1",
        "kind": "PreviewLink",
        "metadata": {"name": name},
        "spec": {"target": {"docker": {"container": f"{prefix}-{container}"}}, "port": 8080,
                 "access": access},
    }


def phases():
    """Counts of links by status.phase, read a page at a time as kubectl does."""
    counts, cont = {}, ""
    while True:
        _, body = call("GET", f"{base}?limit=500&continue={cont}")
        page = json.loads(body)
        for item in page["items"]:
            phase = (item.get("status") or {}).get("phase", "")
            counts[phase] = counts.get(phase, 0) + 1
        cont = page["metadata"].get("continue", "")
        if not cont:
            return counts


def wait_until(what, ok, limit_s):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        state = ok()
        if state is True:
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}: {state}")


def create_to_serving(tag):
    """Seconds from a public link's create to its path URL's first 200, per sample."""
    out = []
    for i in range(samples):
        name = f"probe-{tag}-{i}"
        t = time.monotonic()
        call("POST", base, link(name, i % containers, access="public"))
        deadline = t + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{proxy}/p/{name}.default/", timeout=10) as r:
                    if r.status == 200:
                        break
            except (urllib.error.HTTPError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} never served")
            time.sleep(0.002)
        out.append(time.monotonic() - t)
        call("DELETE", f"{base}/{name}")
    for i in range(samples):
        name = f"probe-{tag}-{i}"
        wait_until(f"{name} to go", lambda: call("GET", f"{base}/{name}")[0] == 404, 120)
    return out


def ms(xs):
    return f"p50 {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms"


def gone():
    c = phases()
    return True if not c else c


idle = rss_mib()
# One link per container first, so the shared injections exist before the measured runs.
with ThreadPoolExecutor(writers) as pool:
    list(pool.map(lambda c: call("POST", base, link(f"warm-{c}", c, access="public")), range(containers)))
wait_until("the warm-up links", lambda: phases() == {"Ready": containers} or phases(), 300)
empty = create_to_serving("empty")
with ThreadPoolExecutor(writers) as pool:
    list(pool.map(lambda c: call("DELETE", f"{base}/warm-{c}"), range(containers)))
wait_until("the warm-up links to go", gone, 300)
time.sleep(10)  # previewd hands freed memory back every 5 s, a second after it was freed
before = rss_mib()

t0 = time.monotonic()
with ThreadPoolExecutor(writers) as pool:
    list(pool.map(lambda i: call("POST", base, link(f"l{i}", i % containers)), range(links)))
created = time.monotonic() - t0
wait_until(f"{links} links Ready", lambda: phases() == {"Ready": links} or phases(), 1800)
ready = time.monotonic() - t0
loaded = create_to_serving("loaded")
at_ready = rss_mib()
# Held with nothing happening: the watch history lets the creates go once they are older
# than 75 s, and previewd's CPU over the wait is what the links cost idle.
cpu0, t_idle = cpu_s(), time.monotonic()
time.sleep(80)
idle_cpu = (cpu_s() - cpu0) / (time.monotonic() - t_idle)
held = rss_mib()
peak = rss_mib("VmHWM")

t1 = time.monotonic()
with ThreadPoolExecutor(writers) as pool:
    list(pool.map(lambda i: call("DELETE", f"{base}/l{i}"), range(links)))
wait_until("every link to go", gone, 1800)
deleted = time.monotonic() - t1
time.sleep(2)  # before previewd first hands freed memory back (every 5 s)
after = rss_mib()
# Idle blocking threads end after 10 s, and the store's watch history lets changes older
# than 75 s go (beyond its latest 100).
time.sleep(88)
settled = rss_mib()

print(f"links: {links} token links over {containers} containers, {writers} writers")
print(f"created in {created:.1f} s ({links / created:.0f}/s), all Ready after {ready:.1f} s, "
      f"deleted in {deleted:.1f} s")
print(f"create -> serving, 0 links present:    {ms(empty)}")
print(f"create -> serving, {links} links present: {ms(loaded)}")
print(f"  ratio (p50 loaded / empty): {statistics.median(loaded) / statistics.median(empty):.2f}")
print(f"RSS: idle {idle:.1f} MiB, before links {before:.1f} MiB, with {links} links Ready "
      f"{at_ready:.1f} MiB (80 s later {held:.1f} MiB, peak {peak:.1f} MiB), after deleting them {after:.1f} MiB "
      f"(90 s later {settled:.1f} MiB)")
for what, rss in (("once Ready", at_ready), ("80 s later", held)):
    growth = rss - before
    print(f"  growth for {links} links {what}: {growth:.1f} MiB = "
          f"{growth / 64 * 10000 / links:.2f} x the goal (64 MiB per 10,000 links); "
          f"{growth * 1024 / links:.1f} KiB per link")
print(f"  previewd's CPU while the {links} links sat idle: {idle_cpu * 100:.1f} % of a core")
print(f"  left after delete: {after - before:+.1f} MiB, 90 s later {settled - before:+.1f} MiB")
PY
