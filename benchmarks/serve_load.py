"""`potq serve` under load: 8 streaming clients at once against SmolLM2-135M pot3 (issue 49's
serving target: all complete, none starved, memory bounded).

    .venv/bin/python benchmarks/serve_load.py      # about 2 minutes on 2 cores -> docs/results/serve-load.md

The server runs as a user starts it (`potq serve FOLDER --port P`, its own process); the clients
are the official `openai` client, one thread each, all sent at once, each streaming a greedy
answer of the same length to its own question. The server decodes one request at a time in
arrival order, so a client's wait for its first token grows with its place in the queue; what
the table checks is that every client completes, that each answer starts as the one before it
ends (none starved), and that the server's memory stays flat while it serves (sampled from
/proc every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from potq.bench.decode import variant_folder
from potq.bench.timing import cpu_name
from potq.paths import home_dir, write_text_atomic

NAME = "smollm2-pot3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemoryWatch:
    """The server's resident memory, sampled every ``period`` seconds in a thread while it runs."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mib(self.pid))
            time.sleep(self.period)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_ready(client: openai.OpenAI, server: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read().strip().splitlines()[-1:]}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(0.5)
    sys.exit(f"the server did not answer within {seconds:.0f} s")


def one_client(client: openai.OpenAI, i: int, tokens: int, start: float) -> dict:
    """One streamed chat answer: when it was sent, its first text, its end (seconds from ``start``)."""
    sent = time.perf_counter() - start
    first, pieces = None, []
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Tell me fact {i}."}],
                                            max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    done = time.perf_counter() - start
    return {"client": i, "sent_s": sent, "first_s": first, "done_s": done, "text": "".join(pieces),
            "completion_tokens": usage.completion_tokens if usage else None}


def markdown(result: dict, command: str) -> str:
    rows = sorted(result["clients"], key=lambda r: r["first_s"] or float("inf"))
    lines = ["# `potq serve` under load", "", "```", command, "```", "",
             f"{result['machine']}; model SmolLM2-135M pot3 G128 (round-to-nearest; the speed, not the quality, "
             f"is measured), served by `potq serve` in its own process with {result['threads']} threads; "
             f"{len(rows)} `openai` clients sent at once from this machine (their threads share its cores with the "
             f"server's), each streaming a greedy answer of at most {result['tokens']} tokens. Rows in the order the "
             f"clients were served; tok/s while served counts from the end of the answer before (its prompt "
             f"included). Decoding alone, without HTTP and clients: [speed](speed.md).", "",
             "| client | first token after (s) | done after (s) | tokens | tok/s while served |",
             "| --- | ---: | ---: | ---: | ---: |"]
    previous_done = 0.0
    for r in rows:
        served = r["done_s"] - max(previous_done, r["sent_s"])
        lines.append(f"| {r['client']} | {r['first_s']:.2f} | {r['done_s']:.2f} | {r['completion_tokens']} | "
                     f"{r['completion_tokens'] / served:.1f} |")
        previous_done = r["done_s"]
    mem = result["rss_mib"]
    lines += ["", f"- completed: {result['completed']} of {len(rows)}; answers equal to the same request sent alone: "
                  f"{result['same_as_alone']}",
              f"- starvation: each answer starts when the one before it ends; the longest gap between an answer's "
              f"last token and the next one's first is {result['longest_gap_s']:.2f} s (the next prompt read), and the "
              f"last client's first token came after {result['longest_wait_s']:.2f} s",
              f"- server memory (RSS): {mem['idle']:.0f} MiB loaded and idle, {mem['peak']:.0f} MiB at the most while "
              f"serving, {mem['after']:.0f} MiB after; all {len(rows)} answers took {result['wall_s']:.1f} s "
              f"({result['total_tokens'] / result['wall_s']:.1f} tok/s together)", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/results/serve-load", help="output path without extension (.md, .json)")
    args = p.parse_args()
    folder = variant_folder("smollm2-135m", "pot3", home_dir() / "bench")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import sys; from potq.cli import main; sys.exit(main())",
                               "serve", folder, "--port", str(port), "--name", NAME, "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        print("starting the server ...", flush=True)
        wait_ready(client, server)
        one_client(client, -1, 4, time.perf_counter())  # the first request pays for describing the model once
        idle = rss_mib(server.pid)
        print(f"{args.clients} clients at once, {args.tokens} tokens each ...", flush=True)
        start = time.perf_counter()
        with MemoryWatch(server.pid) as watch, ThreadPoolExecutor(args.clients) as pool:
            clients = list(pool.map(lambda i: one_client(client, i, args.tokens, start), range(args.clients)))
        wall = time.perf_counter() - start
        after = rss_mib(server.pid)
        print("each request again alone, for its answer ...", flush=True)
        alone = [one_client(client, i, args.tokens, time.perf_counter())["text"] for i in range(args.clients)]
    finally:
        server.terminate()
        server.wait(30)
    served = sorted(clients, key=lambda r: r["first_s"] or float("inf"))
    result = {"machine": cpu_name(), "threads": args.threads, "tokens": args.tokens, "clients": clients,
              "completed": sum(r["completion_tokens"] is not None and r["text"] != "" for r in clients),
              "same_as_alone": all(r["text"] == alone[r["client"]] for r in clients),
              "longest_wait_s": max(r["first_s"] - r["sent_s"] for r in clients),
              "longest_gap_s": max((b["first_s"] - a["done_s"] for a, b in zip(served, served[1:])), default=0.0),
              "rss_mib": {"idle": idle, "peak": max(watch.samples), "after": after},
              "wall_s": wall, "total_tokens": sum(r["completion_tokens"] or 0 for r in clients)}
    command = "python " + " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".json"), json.dumps({"command": command, **result}, indent=1))
    write_text_atomic(out.with_suffix(".md"), markdown(result, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
