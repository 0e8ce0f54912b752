"""Session exec through the client beside the same call made with raw HTTP, one server,
one session, interleaved samples. Prints one JSON object (what `cargo xtask bench --only
client` embeds)."""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from typing import Callable
from urllib.parse import urlparse

import httpx

from sbx_client import Sandbox


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(xs, 50), 3),
        "p90_ms": round(pct(xs, 90), 3),
        "mean_ms": round(statistics.fmean(xs), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execs", type=int, default=200)
    ap.add_argument("--sbx", default=None)
    args = ap.parse_args()
    code = "x = 1"
    with Sandbox.local(args.sbx, env={"SBX_SNAPSHOTS": "0"}) as sbx:
        server = sbx.server
        assert server is not None
        with sbx.session(language="python") as s:
            url = f"/v1/sessions/{s.id}/exec"
            body = json.dumps({"code": code}).encode()
            headers = {
                "Authorization": f"Bearer {server.token}",
                "Content-Type": "application/json",
            }
            raw_httpx = httpx.Client(base_url=server.url, headers=headers)
            parsed = urlparse(server.url)
            conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port)

            def via_client() -> None:
                assert s.exec(code).exit_code == 0

            def via_httpx() -> None:
                r = raw_httpx.post(url, content=body)
                assert r.status_code == 200 and r.json()["exit_code"] == 0

            def via_http_client() -> None:
                conn.request("POST", url, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                assert r.status == 200 and json.loads(data)["exit_code"] == 0

            kinds: dict[str, Callable[[], None]] = {
                "client": via_client,
                "raw_httpx": via_httpx,
                "raw_http_client": via_http_client,
            }
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            for f in kinds.values():  # warm up connections and the REPL
                for _ in range(5):
                    f()
            for _ in range(args.execs):
                for name, f in kinds.items():
                    t = time.perf_counter()
                    f()
                    samples[name].append((time.perf_counter() - t) * 1000)
            raw_httpx.close()
            conn.close()
    out = {name: summary(xs) for name, xs in samples.items()}
    out["execs_each"] = args.execs
    out["client_minus_raw_httpx_p50_ms"] = round(
        out["client"]["p50_ms"] - out["raw_httpx"]["p50_ms"], 3
    )
    out["client_minus_raw_http_client_p50_ms"] = round(
        out["client"]["p50_ms"] - out["raw_http_client"]["p50_ms"], 3
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
