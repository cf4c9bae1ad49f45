#!/usr/bin/env python3
"""Soak test: a coordinator and two workers on loopback under steady random load.

Starts two `moeshard-worker` processes and `moeshard serve` (every expert placed on the
workers) with the bundled fixture model, then runs CLIENTS concurrent clients for DURATION
seconds. Each sends random valid requests (OpenAI chat/completions and completions, streaming
and not, random sampling parameters and stop strings; Ollama /api/chat and /api/generate; model
listings) and, with probability --malformed, a malformed one (bad JSON, wrong types, bad
parameters, unknown model or route, wrong method).

Reports valid requests ok / failed, malformed requests answered with a 4xx, and the resident
memory (VmRSS) of each process after the warm-up and at the end, with its samples every
--sample seconds in between (so a plateau reads apart from steady growth). Exits 1 if any valid request
failed, any malformed one got something other than a 4xx, a process died, or a process grew by
--max-growth percent or more.

Usage: scripts/soak.py [--duration 60] [--clients 8] [--bin-dir target/release]
Build first: cargo build --release --bin moeshard --bin moeshard-worker
Python 3 standard library only.
"""

import argparse
import http.client
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "tests", "fixtures", "kq-mellum-q4_k_m.gguf")
WORDS = "def class return import list dict value the a of to in for while print sort merge key".split()
STOPS = ["\n\n", "def", "return", ")", "the", "###", "}"]
TIMEOUT = 120


def start(cmd, env, what):
    """Starts cmd and returns (process, rest of its 'listening on REST' line)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    result = {}

    def read():
        for line in proc.stdout:
            if line.startswith("listening on ") and "rest" not in result:
                result["rest"] = line[len("listening on "):].strip()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    deadline = time.time() + 120
    while "rest" not in result:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"{what} did not start")
        time.sleep(0.05)
    return proc, result["rest"]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def sampling(rng):
    p = {}
    if rng.random() < 0.3:
        p["temperature"] = 0
    else:
        p["temperature"] = round(rng.uniform(0.1, 1.5), 2)
    for key, gen in [
        ("top_p", lambda: round(rng.uniform(0.5, 1.0), 2)),
        ("top_k", lambda: rng.randint(1, 100)),
        ("min_p", lambda: round(rng.uniform(0.0, 0.2), 2)),
        ("seed", lambda: rng.randint(0, 2**31)),
        ("presence_penalty", lambda: round(rng.uniform(-1, 1), 2)),
        ("frequency_penalty", lambda: round(rng.uniform(-1, 1), 2)),
    ]:
        if rng.random() < 0.4:
            p[key] = gen()
    if rng.random() < 0.4:
        p["stop"] = rng.sample(STOPS, rng.randint(1, 3))
    return p


def valid_request(rng):
    """(method, path, body or None, kind) of a random valid request; kind says how to read it."""
    r = rng.random()
    n = rng.randint(1, 40)
    if r < 0.35:
        msgs = [{"role": "user", "content": text(rng, 2, 30)}]
        if rng.random() < 0.3:
            msgs.insert(0, {"role": "system", "content": text(rng, 2, 10)})
        body = {"messages": msgs, "max_tokens": n, **sampling(rng)}
        if rng.random() < 0.5:
            body["stream"] = True
            return "POST", "/v1/chat/completions", body, "sse"
        return "POST", "/v1/chat/completions", body, "json"
    if r < 0.6:
        body = {"prompt": text(rng, 1, 40), "max_tokens": n, **sampling(rng)}
        if rng.random() < 0.5:
            body["stream"] = True
            return "POST", "/v1/completions", body, "sse"
        return "POST", "/v1/completions", body, "json"
    if r < 0.75:
        opts = {"num_predict": n, "temperature": round(rng.uniform(0, 1.2), 2)}
        if rng.random() < 0.3:
            opts["stop"] = rng.sample(STOPS, 1)
        body = {"model": "soak", "messages": [{"role": "user", "content": text(rng, 2, 20)}], "options": opts}
        if rng.random() < 0.5:
            body["stream"] = False
            return "POST", "/api/chat", body, "json"
        return "POST", "/api/chat", body, "ndjson"
    if r < 0.9:
        body = {"model": "soak", "prompt": text(rng, 1, 20), "options": {"num_predict": n}}
        if rng.random() < 0.5:
            body["stream"] = False
            return "POST", "/api/generate", body, "json"
        return "POST", "/api/generate", body, "ndjson"
    return "GET", rng.choice(["/v1/models", "/health", "/api/tags", "/api/version"]), None, "json"


def malformed_request(rng):
    """(method, path, raw body bytes or None) that must get a 4xx."""
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"'),
        ("POST", "/v1/chat/completions", b"not json"),
        ("POST", "/v1/chat/completions", json.dumps({"messages": 5}).encode()),
        ("POST", "/v1/chat/completions", json.dumps({"messages": msgs, "temperature": -1}).encode()),
        ("POST", "/v1/chat/completions", json.dumps({"messages": msgs, "max_tokens": -3}).encode()),
        ("POST", "/v1/chat/completions", json.dumps({"messages": msgs, "model": "no-such-model"}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": [999999999]}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "top_p": "high"}).encode()),
        ("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10**9}).encode()),
        ("POST", "/api/chat", json.dumps({"messages": "hi"}).encode()),
        ("POST", "/api/generate", b"\xff\xfe\x00garbage"),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/v1/no-such-route", None),
    ]
    return rng.choice(cases)


def read_valid(resp, kind):
    """Reads a 200 response to its end and checks its shape; returns an error string or None."""
    data = resp.read()
    if resp.status != 200:
        return f"HTTP {resp.status}: {data[:200]!r}"
    try:
        if kind == "json":
            json.loads(data)
        elif kind == "sse":
            events = [e for e in data.decode().split("\n\n") if e.strip()]
            if not events or events[-1] != "data: [DONE]":
                return f"stream did not end with [DONE]: {data[-200:]!r}"
            for e in events[:-1]:
                json.loads(e.removeprefix("data: "))
        else:
            lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
            if not lines or not lines[-1].get("done"):
                return f"NDJSON stream did not end with done: {data[-200:]!r}"
    except (ValueError, UnicodeDecodeError) as e:
        return f"bad body ({e}): {data[:200]!r}"
    return None


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.failed = self.malformed_4xx = self.malformed_other = 0
        self.errors = []

    def add(self, field, error=None):
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)
            if error and len(self.errors) < 20:
                self.errors.append(error)


def client(host, port, seed, deadline, malformed_share, stats, stop):
    rng = random.Random(seed)
    while time.time() < deadline and not stop.is_set():
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            if rng.random() < malformed_share:
                method, path, raw = malformed_request(rng)
                conn.request(method, path, body=raw, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if 400 <= resp.status < 500:
                    stats.add("malformed_4xx")
                else:
                    stats.add("malformed_other", f"malformed {method} {path}: HTTP {resp.status}")
            else:
                method, path, body, kind = valid_request(rng)
                raw = json.dumps(body).encode() if body is not None else None
                conn.request(method, path, body=raw, headers={"content-type": "application/json"})
                error = read_valid(conn.getresponse(), kind)
                if error:
                    stats.add("failed", f"{method} {path}: {error}")
                else:
                    stats.add("ok")
        except (OSError, http.client.HTTPException) as e:
            stats.add("failed", f"connection error: {e!r}")
        finally:
            conn.close()


def run_clients(args, host, port, seconds, stats, seed):
    stop = threading.Event()
    deadline = time.time() + seconds
    threads = [
        threading.Thread(target=client, args=(host, port, seed + i, deadline, args.malformed, stats, stop), daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + TIMEOUT + 30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load after the warm-up (default 60)")
    ap.add_argument("--warmup", type=float, default=20, help="seconds of load before the first RSS sample")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--malformed", type=float, default=0.05, help="share of malformed requests (default 0.05)")
    ap.add_argument("--max-growth", type=float, default=5.0, help="RSS growth in percent that fails (default 5)")
    ap.add_argument("--model", default=MODEL, help="GGUF model (default: the kq-mellum-q4_k_m fixture)")
    ap.add_argument("--bin-dir", default=os.path.join(REPO, "target", "release"))
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sample", type=float, default=10, help="seconds between RSS samples (default 10)")
    args = ap.parse_args()

    env = dict(os.environ, MOESHARD_CLUSTER_KEY=secrets.token_hex(16))
    tmp = tempfile.mkdtemp(prefix="moeshard-soak-")
    procs = {}
    try:
        workers = []
        for name in ("w1", "w2"):
            cmd = [os.path.join(args.bin_dir, "moeshard-worker"), "--listen", "127.0.0.1:0", "--no-mdns",
                   "--name", name, "--threads", "1", "--cache-dir", os.path.join(tmp, name)]
            procs[name], rest = start(cmd, env, f"worker {name}")
            workers.append(rest.split()[0])
        placement = os.path.join(tmp, "placement")
        with open(placement, "w") as f:
            f.write("* * w1,w2\n")
        cmd = [os.path.join(args.bin_dir, "moeshard"), "serve", "-m", args.model, "--port", "0", "--alias", "soak",
               "--no-discovery", "--worker", workers[0], "--worker", workers[1], "--placement", placement,
               "--parallel", str(args.parallel), "-t", "2"]
        procs["serve"], url = start(cmd, env, "moeshard serve")
        host, port = url.removeprefix("http://").rsplit(":", 1)
        port = int(port)
        print(f"serve at {url}, workers at {workers[0]} and {workers[1]}; "
              f"{args.clients} clients, {args.warmup:.0f} s warm-up, {args.duration:.0f} s soak", flush=True)

        warm = Stats()
        run_clients(args, host, port, args.warmup, warm, args.seed * 1000)
        start_rss = {name: rss_kib(p.pid) for name, p in procs.items()}
        samples = {name: [] for name in procs}
        sampling = threading.Event()

        def sample():
            while not sampling.wait(args.sample):
                for name, p in procs.items():
                    if p.poll() is None:
                        samples[name].append(rss_kib(p.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stats = Stats()
        began = time.time()
        run_clients(args, host, port, args.duration, stats, args.seed * 1000 + 500)
        elapsed = time.time() - began
        sampling.set()
        sampler.join()
        dead = [name for name, p in procs.items() if p.poll() is not None]
        end_rss = {name: rss_kib(p.pid) for name, p in procs.items() if p.poll() is None}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()

    bad = False
    total = stats.ok + stats.failed
    print(f"warm-up: {warm.ok} ok, {warm.failed} failed")
    print(f"soak: {elapsed:.0f} s, {total} valid requests: {stats.ok} ok, {stats.failed} failed "
          f"({total / max(elapsed, 1e-9):.1f} req/s)")
    print(f"malformed: {stats.malformed_4xx + stats.malformed_other}, answered 4xx: {stats.malformed_4xx}")
    for e in warm.errors + stats.errors:
        print(f"  error: {e}")
    bad |= stats.failed > 0 or warm.failed > 0 or stats.malformed_other > 0
    for name in procs:
        if name in dead:
            print(f"{name}: DIED")
            bad = True
            continue
        growth = (end_rss[name] - start_rss[name]) / start_rss[name] * 100
        print(f"{name}: RSS {start_rss[name] / 1024:.1f} MiB -> {end_rss[name] / 1024:.1f} MiB ({growth:+.2f}%)")
        trace = samples[name]
        if trace:
            picks = [trace[min(len(trace) - 1, len(trace) * k // 8)] for k in range(1, 9)]
            print(f"  samples every {args.sample:.0f} s, at each eighth of the soak (MiB): "
                  + " ".join(f"{kib / 1024:.1f}" for kib in picks))
        bad |= growth >= args.max_growth
    print("FAIL" if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
