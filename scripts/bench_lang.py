"""The frontend language vs the same requests sent as plain `/generate` calls.

    python scripts/bench_lang.py --shots 24 --batch 64 --repeats 3

Two workloads on one engine (SmolLM2 unless `--model-path`; `--quick`: a tiny random
model, to check the script works), the radix cache flushed
before every measured run:
- **branching**: a long shared context, `fork(4)`, three `gen`s in each branch;
- **few-shot batch**: `run_batch` of `--batch` programs behind one few-shot prompt.
Each runs through `jaxserve.lang` (which prefills the shared prefix once before `fork` and
before the batch) on the in-process backend and on `RuntimeEndpoint` over HTTP, and as
"raw" calls: the same texts, each gen one `/generate` over HTTP from its own thread, no
prefix prefill. Reports seconds (median of `--repeats`) and the raw/lang time ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import httpx

FACTS = ["The Nile is the longest river in Africa.", "Mount Everest is the highest mountain on Earth.",
         "The Pacific is the largest ocean.", "Honey never spoils if kept sealed.",
         "Octopuses have three hearts.", "Venus rotates in the opposite direction to most planets."]
QUESTIONS = [f"What is {a} times {b}?" for a in range(2, 10) for b in range(2, 10)]


def build_programs(sgl, shots: int, gen_tokens: int):
    context = "Background notes.\n" + "\n".join(FACTS[i % len(FACTS)] + f" (note {i})" for i in range(shots)) + "\n"
    examples = "".join(f"Q: What is {i} times 3?\nA: {3 * i}\n" for i in range(2, 2 + shots))

    @sgl.function
    def branching(s, topic):
        s += context + "Topic: " + topic + "\n"
        forks = s.fork(4)
        for step in range(3):
            forks += lambda i: f"Branch {i}, step {step}:" + sgl.gen(f"g{step}", max_tokens=gen_tokens,
                                                                    temperature=0, ignore_eos=True)
        forks.join()

    @sgl.function
    def few_shot(s, question):
        s += examples + "Q: " + question + "\nA:"
        s += sgl.gen("answer", max_tokens=gen_tokens, temperature=0, ignore_eos=True)

    return branching, few_shot, context, examples


def raw_generate(client: httpx.Client, text: str, gen_tokens: int) -> str:
    body = {"text": text, "sampling_params": {"max_new_tokens": gen_tokens, "temperature": 0, "ignore_eos": True}}
    r = client.post("/generate", json=body)
    r.raise_for_status()
    return r.json()["text"]


def raw_branching(client, context: str, topic: str, gen_tokens: int) -> None:
    def branch(i):
        text = context + "Topic: " + topic + "\n"
        for step in range(3):
            text += f"Branch {i}, step {step}:"
            text += raw_generate(client, text, gen_tokens)
    threads = [threading.Thread(target=branch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def raw_few_shot(client, examples: str, questions: list[str], gen_tokens: int) -> None:
    threads = [threading.Thread(target=raw_generate, args=(client, examples + "Q: " + q + "\nA:", gen_tokens))
               for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def timed(engine, fn, repeats: int) -> float:
    """Median seconds of `repeats` runs on a flushed cache, after one untimed run (compiles)."""
    engine.flush_cache()
    fn()
    times = []
    for _ in range(repeats):
        engine.flush_cache()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--shots", type=int, default=24, help="lines of shared context / few-shot examples")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    args = parser.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    knobs = dict(context_length=2048, max_running_requests=max(args.batch, 8))
    if args.quick:  # a tiny random model and small shapes: it only checks the script works
        args.shots, args.batch, args.gen_tokens, args.repeats = 4, 4, 2, 1
        knobs = dict(context_length=512, max_running_requests=8, max_prefill_tokens=128, chunked_prefill_size=128)
        if args.model_path is None:
            from bench_host_overhead import tiny_model  # scripts/ is on the path when run as a script

            args.model_path = tiny_model(tmp.name)

    import jaxserve
    import jaxserve.lang as sgl
    from jaxserve.server import ServerThread

    engine = jaxserve.Engine(args.model_path, **knobs)
    server = ServerThread(engine)
    client = httpx.Client(base_url=server.url, timeout=None, limits=httpx.Limits(max_connections=256))
    branching, few_shot, context, examples = build_programs(sgl, args.shots, args.gen_tokens)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.batch)]
    backends = {"in-process": sgl.EngineBackend(engine), "HTTP": sgl.RuntimeEndpoint(server.url)}
    try:
        rows = []
        raw = timed(engine, lambda: raw_branching(client, context, "rivers", args.gen_tokens), args.repeats)
        rows.append(("branching (fork 4 x 3 gens)", "raw /generate", raw, 12))
        for name, backend in backends.items():
            t = timed(engine, lambda: branching.run(topic="rivers", backend=backend), args.repeats)
            rows.append(("branching (fork 4 x 3 gens)", f"lang, {name}", t, 12))
        raw = timed(engine, lambda: raw_few_shot(client, examples, questions, args.gen_tokens), args.repeats)
        rows.append((f"few-shot batch of {args.batch}", "raw /generate", raw, args.batch))
        for name, backend in backends.items():
            t = timed(engine, lambda: few_shot.run_batch([{"question": q} for q in questions], backend=backend),
                      args.repeats)
            rows.append((f"few-shot batch of {args.batch}", f"lang, {name}", t, args.batch))
    finally:
        client.close()
        server.stop()
        engine.shutdown()

    print(f"\nshared context: {args.shots} lines; {args.gen_tokens} tokens per gen; median of {args.repeats}\n")
    print("| workload | client | seconds | gens/s | raw/this time ratio |")
    print("|---|---|---|---|---|")
    raw_time = {}
    for workload, client_name, seconds, gens in rows:
        raw_time.setdefault(workload, seconds)
        print(f"| {workload} | {client_name} | {seconds:.2f} | {gens / seconds:.1f} | "
              f"{raw_time[workload] / seconds:.2f}x |")
    by = {(w, c): s for w, c, s, _ in rows}
    for workload in raw_time:
        ratio = by[(workload, "lang, in-process")] / by[(workload, "lang, HTTP")]
        print(f"{workload}: in-process/HTTP time ratio {ratio:.2f}")
    print("lang speed-up over raw calls: " + ", ".join(
        f"{w} {raw_time[w] / by[(w, 'lang, in-process')]:.2f}x" for w in raw_time))


if __name__ == "__main__":
    main()
