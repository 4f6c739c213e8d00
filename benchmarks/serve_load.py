"""Load test of `multitune serve` against a naive server, on loopback only, bounded in count and time.

    python benchmarks/serve_load.py RUN_DIR [--requests 10000] [--clients 64] [--time-limit 150]

Starts each server in its own process on 127.0.0.1, one after the other:
- multitune: `multitune serve RUN_DIR`: one backbone for every task, dynamic micro-batching across tasks;
- naive: one full model copy per task (as one fine-tuned model per task would be), each request run alone.
Then `--clients` concurrent httpx clients send `--requests` single-input requests, a seeded mix over all
tasks of the run built from the tasks' own test (or validation) data, until all are answered or the time
limit passes. Reports throughput, p50/p99 latency and the count of 5xx answers; writes a JSON file.
With `--rates 20,40,80` the load is offered instead (open loop): Poisson arrivals at each rate for
`--duration` seconds, latency counted from each request's arrival; p50/p90/p99, timeouts and 5xx per rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"  # loopback only


def naive_server(run_dir: str, port: int, threads: int | None) -> None:
    """One full model per task; a lock runs each request alone, as a per-task model server would."""
    import torch
    import uvicorn
    from fastapi import FastAPI, HTTPException

    from multitune.serving.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    engine = Engine(run_dir, one_model_per_task=True)
    app = FastAPI()
    lock = threading.Lock()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "batches": engine.stats.batches, "rows": engine.stats.rows}

    @app.post("/v1/tasks/{task}/predict")
    def predict(task: str, body: dict[str, Any]) -> dict[str, Any]:  # FastAPI runs it on its thread pool
        if task not in engine.tasks:
            raise HTTPException(404, f"no task '{task}'")
        records = body.get("inputs") or [body["input"]]
        with lock:
            [predictions] = engine.run([(task, engine.encode(task, records))])
        return {"task": task, "predictions": predictions}

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


def request_mix(run_dir: str, count: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """`count` (task, record) pairs, tasks drawn uniformly, records from each task's test or validation rows."""
    import yaml

    from multitune.catalogue import validate_config
    from multitune.data.tasks import load_tasks

    config = validate_config(yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8")))
    tasks = load_tasks(config.tasks, config.run.seed)
    pools: dict[str, list[dict[str, Any]]] = {}
    for name, task in tasks.items():
        examples = task.splits.get("test") or task.splits["validation"]
        kind = task.config.type
        if kind == "token_classification":
            pools[name] = [{"tokens": list(e.texts)} for e in examples]
        elif kind == "pair_classification" or len(examples[0].texts) > 1:
            pools[name] = [{"text": e.texts[0], "text_pair": e.texts[1]} for e in examples]
        else:
            pools[name] = [{"text": e.texts[0]} for e in examples]
    rng = random.Random(seed)
    names = sorted(pools)
    return [(task, rng.choice(pools[task])) for task in (rng.choice(names) for _ in range(count))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def start(command: list[str], url: str) -> subprocess.Popen[bytes]:
    import httpx

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"server did not start: {' '.join(command)}")


def quantiles(latencies: list[float]) -> Any:
    """q -> the q-quantile of `latencies` (seconds) in milliseconds, 0 without any."""
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else 0.0

    return quantile


async def load(url: str, mix: list[tuple[str, dict[str, Any]]], clients: int, time_limit: float) -> dict[str, Any]:
    """Send the mix with `clients` concurrent clients until done or out of time."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: dict[str, int] = {}
    pending = iter(mix)
    stop_at = time.monotonic() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        for task, record in pending:
            if time.monotonic() > stop_at:
                return
            began = time.perf_counter()
            try:
                response = await http.post(f"/v1/tasks/{task}/predict", json={"input": record})
            except httpx.HTTPError as error:
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - began)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        for task, record in mix[:16]:  # warm up, not counted
            await http.post(f"/v1/tasks/{task}/predict", json={"input": record})
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - began
        health = (await http.get("/healthz")).json()
    quantile = quantiles(latencies)

    return {
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
        "status_counts": statuses,
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "transport_failures": failures,
        "server": health,
    }


async def open_loop(
    url: str, mix: list[tuple[str, dict[str, Any]]], rate: float, duration: float, seed: int, grace: float
) -> dict[str, Any]:
    """An offered load: requests arrive at `rate` per second (Poisson: seeded exponential gaps) for `duration`
    seconds, each sent at its arrival time whatever the earlier ones are doing. Latency counts from the
    arrival (so a server that falls behind is charged for the wait, no coordinated omission); a request not
    answered within `grace` seconds after the last arrival is a timeout."""
    import httpx

    rng = random.Random(seed)
    arrivals, moment = [], 0.0
    while True:
        moment += rng.expovariate(rate)
        if moment >= duration:
            break
        arrivals.append(moment)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: dict[str, int] = {}
    limits = httpx.Limits(max_connections=900, max_keepalive_connections=900)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=duration + grace) as http:
        for task, record in mix[:16]:  # warm up, not counted
            await http.post(f"/v1/tasks/{task}/predict", json={"input": record})
        began = time.perf_counter()

        async def one(at: float, task: str, record: dict[str, Any]) -> None:
            delay = began + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                response = await http.post(f"/v1/tasks/{task}/predict", json={"input": record})
            except httpx.HTTPError as error:
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
                return
            latencies.append(time.perf_counter() - began - at)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        jobs = [asyncio.create_task(one(at, *mix[i % len(mix)])) for i, at in enumerate(arrivals)]
        _, late = await asyncio.wait(jobs, timeout=duration + grace)
        for job in late:
            job.cancel()
        seconds = time.perf_counter() - began
        health = (await http.get("/healthz")).json()
    quantile = quantiles(latencies)

    return {
        "offered_rps": rate,
        "offered": len(arrivals),
        "answered": len(latencies),
        "timeouts": len(late),
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": quantile(0.50),
        "p90_ms": quantile(0.90),
        "p99_ms": quantile(0.99),
        "status_counts": statuses,
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "transport_failures": failures,
        "server": health,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds per server")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of each server (0: default)")
    parser.add_argument("--only", choices=["multitune", "naive"], help="test one server only")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    parser.add_argument(
        "--rates",
        default=None,
        help="offered loads, requests/s, comma-separated (e.g. 20,40,80): open-loop Poisson arrivals instead of "
        "--clients closed-loop clients",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per offered load")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to wait for answers after the last arrival")
    parser.add_argument("--server-option", action="append", default=[], help="extra `multitune serve` option")
    parser.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_server:
        naive_server(args.run_dir, args.port, args.threads)
        return
    mix = request_mix(args.run_dir, args.requests)
    servers = {
        "multitune": [
            sys.executable,
            "-m",
            "multitune",
            "serve",
            args.run_dir,
            "--max-queue",
            "4096",
            "--threads",
            str(args.threads),
            *(part for option in args.server_option for part in option.split()),
        ],
        "naive": [sys.executable, __file__, args.run_dir, "--naive-server", "--threads", str(args.threads)],
    }
    results: dict[str, Any] = {
        "run": args.run_dir,
        "requests": args.requests,
        "clients": args.clients,
        "torch_threads": args.threads,
        "time_limit_s": args.time_limit,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "tasks": sorted({task for task, _ in mix}),
    }
    for name, command in servers.items():
        if args.only and name != args.only:
            continue
        port = free_port()
        url = f"http://{HOST}:{port}"
        process = start([*command, "--port", str(port)], url)
        try:
            cpu_before = cpu_seconds(process.pid)
            if args.rates:  # open loop: each offered load in turn on the same server
                rates = [float(r) for r in args.rates.split(",")]
                runs = [asyncio.run(open_loop(url, mix, r, args.duration, 7, args.grace)) for r in rates]
                results[name] = {"loads": runs, "requests": sum(r["answered"] for r in runs)}
                for run in runs:
                    print(name, json.dumps({k: v for k, v in run.items() if k != "server"}), flush=True)
            else:
                results[name] = asyncio.run(load(url, mix, args.clients, args.time_limit))
            used = cpu_seconds(process.pid) - cpu_before
            results[name]["server_cpu_ms_per_request"] = round(1000 * used / max(results[name]["requests"], 1), 1)
            results[name]["server_rss_mib"] = resident_mib(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
        print(name, json.dumps(results[name]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.rates:
        print("| server | offered (req/s) | answered | timeouts | throughput (req/s) | p50 | p90 | p99 (ms) | 5xx |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in servers:
            for r in results.get(name, {}).get("loads", []):
                print(
                    f"| {name} | {r['offered_rps']:g} | {r['answered']} | {r['timeouts']} | {r['throughput_rps']} | "
                    f"{r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['server_errors_5xx']} |"
                )
        return
    print("| server | requests | seconds | throughput (req/s) | p50 (ms) | p99 (ms) | 5xx | CPU ms/request | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in servers:
        if name in results:
            r = results[name]
            print(
                f"| {name} | {r['requests']} | {r['seconds']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p99_ms']}"
                f" | {r['server_errors_5xx']} | {r['server_cpu_ms_per_request']} | {r['server_rss_mib']} |"
            )


if __name__ == "__main__":
    main()
