"""Load test of `llmrun serve` against `llmrun bench --batch N` in one invocation (docs/performance.md).

    .venv/bin/python scripts/serve_load.py --model smollm2 --clients 16 --new-tokens 64

1. `llmrun bench MODEL --batch N --new-tokens T`'s batched case (no HTTP; its measuring code, in
   this process, the model then released): the engine's batched figures.
2. `llmrun serve MODEL --batch N` in a subprocess; N clients stream /v1/completions at once, each
   with the bench's own 128-token prompt i (token ids, greedy): total generated tok/s over the wall
   time, time to first token p50/p95 (first text chunk, seen by the client).
3. A shared system prompt of ~1,000 tokens: the first request's time to first token, then a
   second request with the same system prompt and another question (a prefix-cache hit).
4. The idle server's CPU use over a few seconds, and its exit status after SIGTERM.
5. With --llama-cpp (the llama-cpp-python package installed, with its server's dependencies):
   `python -m llama_cpp.server` on the GGUF the model was imported from, the same N clients with
   the same prompts (as text), greedy; requests queue instead of interrupting each other (its
   default, which would count cut-off replies), and as it reports no usage when streaming, its
   tokens are its text chunks.

Prints one JSON object. Timings on a shared machine move with its load: compare the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_SENTENCE = ("You are a careful assistant for a library's help desk. You answer questions about opening "
                   "hours, borrowing rules, fines, reading rooms and the catalogue, briefly and politely. ")


def bench_batch(model: str, clients: int, new_tokens: int, reps: int) -> dict:
    """`llmrun bench --batch N`'s batched case without HTTP (its own measuring code, that case only):
    decode tok/s, and tok/s over the whole call (prefill included)."""
    from llmrun.bench.measure import llmrun_case
    from llmrun.bench.workload import Case
    from llmrun.engine.build import EngineOptions
    from llmrun.runtime import open_model

    opened = open_model(model, EngineOptions(batch=clients), show_progress=False)
    with opened.engine:
        result = llmrun_case(opened.engine, Case(f"prompt128_b{clients}", 128, new_tokens, clients), reps)
    ttft, decode = result.ttft_s.median, result.decode_tok_s.median
    whole_s = ttft + clients * (new_tokens - 1) / decode
    return {"decode_tok_s": decode, "ttft_s": ttft, "total_tok_s": clients * new_tokens / whole_s,
            "dtype": opened.engine.plan.dtype}


class Server:
    """`llmrun serve` (or, given a command, another OpenAI-compatible server on `port`)."""

    def __init__(self, model: str, clients: int, command: list[str] | None = None, port: int = 0):
        self.model = model
        command = command or [sys.executable, "-m", "llmrun", "serve", model, "--port", "0", "--batch", str(clients)]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        if port:
            self.url = urlparse(f"http://127.0.0.1:{port}")
        else:
            for line in self.proc.stderr:
                if " on http://" in line:
                    self.url = urlparse(line.split(" on ", 1)[1].split()[0])
                    break
            else:
                raise SystemExit(f"the server did not start (exit {self.proc.wait()})")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()
        health = "/health" if not port else "/v1/models"
        while self.get(health) != 200:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode})")
            time.sleep(0.2)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=600)

    def get(self, path: str) -> int:
        try:
            connection = self.connection()
            connection.request("GET", path)
            return connection.getresponse().status
        except OSError:
            return 0

    def stream(self, path: str, body: dict) -> dict:
        """One streamed request: client-side time to first text, tokens (from usage), end time."""
        started = time.perf_counter()
        connection = self.connection()
        connection.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        first, usage, chunks = None, {}, 0
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            for choice in data.get("choices") or []:
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
        # llama-cpp-python's server sends no usage when streaming: there, one text chunk is one token
        return {"ttft_s": (first or time.perf_counter()) - started, "tokens": usage.get("completion_tokens", chunks),
                "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
                "prompt_tokens": usage.get("prompt_tokens", 0), "ended": time.perf_counter()}

    def cpu_seconds(self) -> float:
        import psutil

        times = psutil.Process(self.proc.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def concurrent_streams(server: Server, prompts: list[list[int]], new_tokens: int) -> dict:
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i):
        barrier.wait()
        results[i] = server.stream("/v1/completions", {"model": server.model, "prompt": prompts[i], "max_tokens": new_tokens,
                                                       "temperature": 0})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = max(r["ended"] for r in results) - started
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results), "ttfts": [r["ttft_s"] for r in results]}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def shared_system_prompt(server: Server, variant: int, tokens_wanted: int) -> dict:
    system = f"Desk {variant}. " + SYSTEM_SENTENCE * (tokens_wanted // 30)
    def ask(question):
        return server.stream("/v1/chat/completions", {"model": server.model, "max_tokens": 8, "temperature": 0,
                                                      "messages": [{"role": "system", "content": system},
                                                                   {"role": "user", "content": question}]})
    first, second = ask("When do you open on Sundays?"), ask("How long may I keep a book?")
    return {"prompt_tokens": first["prompt_tokens"], "first_ttft_s": first["ttft_s"],
            "second_ttft_s": second["ttft_s"], "second_cached": second["cached"]}


def llama_cpp_server(source, prompts_text: list[str], clients: int, new_tokens: int, threads: int) -> dict:
    """llama-cpp-python's OpenAI server on the model's own GGUF, the same concurrent load (text prompts)."""
    import socket

    from llmrun.bench.llamacpp import source_gguf

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with source_gguf(source.path) as gguf:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                   "--n_threads", str(threads), "--n_ctx", "4096", "--model_alias", source.name,
                   "--interrupt_requests", "False"]  # its default: each new request cuts off the running one
        server = Server(source.name, clients, command, port)
        try:
            concurrent_streams(server, prompts_text[:2], 4)  # warm-up
            load = concurrent_streams(server, prompts_text, new_tokens)
        finally:
            server.stop()
    return {"total_tok_s": load["tokens"] / load["wall_s"], "ttft_p50_s": percentile(load["ttfts"], 0.5),
            "ttft_p95_s": percentile(load["ttfts"], 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2, help="timed rounds of the concurrent load (and of bench)")
    parser.add_argument("--system-tokens", type=int, default=1000, help="about how long the shared system prompt is")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--llama-cpp", action="store_true", help="also load llama-cpp-python's server")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from llmrun.bench.workload import prompt_ids
    from llmrun.engine.tokenizer import load_tokenizer
    from llmrun.runtime import present_or_pulled

    source = present_or_pulled(args.model)
    tokenizer = load_tokenizer(source.path)
    prompts = [prompt_ids(tokenizer, 128, i) for i in range(args.clients)]
    report = {"model": source.name, "clients": args.clients, "new_tokens": args.new_tokens}
    if not args.skip_bench:
        report["bench"] = bench_batch(args.model, args.clients, args.new_tokens, args.reps)

    server = Server(args.model, args.clients)
    try:
        concurrent_streams(server, prompts, args.new_tokens)  # warm-up (and the prompts now cached)
        rounds, ttfts = [], []
        for rep in range(args.reps):
            # each round prompts the prefix cache has not seen: another first token changes every block's name
            fresh = [[p[0] + rep + 1] + p[1:] for p in prompts]
            load = concurrent_streams(server, fresh, args.new_tokens)
            rounds.append(load["tokens"] / load["wall_s"])
            ttfts += load["ttfts"]
        report["serve"] = {"total_tok_s": statistics.median(rounds), "rounds_tok_s": rounds,
                           "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95)}
        report["serve"]["ttft_p95_over_p50"] = report["serve"]["ttft_p95_s"] / report["serve"]["ttft_p50_s"]
        shared = [shared_system_prompt(server, variant, args.system_tokens) for variant in range(3)]
        report["shared_system_prompt"] = shared
        report["shared_system_prompt_ratio"] = statistics.median(s["second_ttft_s"] / s["first_ttft_s"]
                                                                 for s in shared)
        time.sleep(1.0)
        before = server.cpu_seconds()
        time.sleep(5.0)
        report["idle_cpu_s_per_5s"] = round(server.cpu_seconds() - before, 3)
    finally:
        report["exit_status_after_sigterm"] = server.stop()
    if args.llama_cpp:
        import torch

        texts = [tokenizer.decode(p) for p in prompts]
        report["llama_cpp_server"] = llama_cpp_server(source, texts, args.clients, args.new_tokens,
                                                      torch.get_num_threads())
        theirs = report["llama_cpp_server"]["total_tok_s"]
        report["serve_over_llama_cpp"] = report["serve"]["total_tok_s"] / theirs if theirs else None
    if "bench" in report:
        report["serve_over_bench_total"] = report["serve"]["total_tok_s"] / report["bench"]["total_tok_s"]
        report["serve_over_bench_decode"] = report["serve"]["total_tok_s"] / report["bench"]["decode_tok_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
