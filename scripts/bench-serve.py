#!/usr/bin/env python3
"""Benchmarks a running `moeshard serve` (or llama-server) through /v1/completions.

1. Aggregate decode throughput: N concurrent greedy streams vs one stream (same prompts).
2. Time to first token (server-side `timings.prompt_ms`) of a request sharing a long prefix with
   the previous one vs a cold one.

Usage: scripts/bench-serve.py http://127.0.0.1:8080 [--streams 8] [--tokens 64] [--prefix 1000]
Prompts are token ids, so the figures do not depend on the tokenizer. Standard library only.
"""
import argparse
import json
import random
import threading
import time
import urllib.request


def completion(url, prompt, max_tokens):
    """One greedy completion; returns the server's timings (llama-server's `timings` object)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["timings"]


def decode_rate(url, prompts, max_tokens):
    """Aggregate decode tokens/s of concurrent requests: generated tokens over the longest
    generation phase (each request's prompt phase excluded)."""
    results = [None] * len(prompts)

    def run(i):
        results[i] = completion(url, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(r["predicted_n"] for r in results)
    return tokens / (max(r["predicted_ms"] for r in results) / 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args()
    rng = random.Random(1)
    prompts = [[rng.randrange(10, args.vocab) for _ in range(8)] for _ in range(args.streams)]
    completion(args.url, prompts[0], 4)  # warm-up
    one = decode_rate(args.url, prompts[:1], args.tokens)
    many = decode_rate(args.url, prompts, args.tokens)
    print(f"decode: 1 stream {one:.2f} tok/s, {args.streams} streams {many:.2f} tok/s aggregate, ratio {many / one:.2f}x")

    base = [rng.randrange(10, args.vocab) for _ in range(args.prefix)]
    cold_prompt = [rng.randrange(10, args.vocab) for _ in range(args.prefix + 24)]
    completion(args.url, base, 1)
    warm = completion(args.url, base + [rng.randrange(10, args.vocab) for _ in range(24)], 1)["prompt_ms"]
    cold = completion(args.url, cold_prompt, 1)["prompt_ms"]
    print(f"time to first token: shared {args.prefix}-token prefix {warm:.1f} ms, cold {cold:.1f} ms, ratio {warm / cold:.3f}")


if __name__ == "__main__":
    main()
