"""Replays `lm bench serve`'s ShareGPT load on the engine in-process (no HTTP): the same requests, at most
--concurrency in flight, greedy; prints output tokens/s and where the step time goes (decode-only steps, steps
with prefill, their token counts and durations), so engine changes can be measured without the server.

    python benchmarks/engine_replay.py ./workspace [--num-prompts 128 --concurrency 64 --max-output-len 256]
"""

import argparse
import statistics
import time
from collections import defaultdict

from lmcli.bench import datasets
from lmcli.engine.engine import Engine
from lmcli.engine.prompt import encode_chat
from lmcli.engine.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument("--random", default=None, help="IN,OUT: a random set with ignore_eos instead of ShareGPT")
    ap.add_argument("--max-prefill-token-num", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    engine = Engine(args.workspace, dtype=args.dtype, max_prefill_token_num=args.max_prefill_token_num)
    tok = engine.tokenizer
    if args.random:
        n_in, n_out = map(int, args.random.split(","))
        requests = datasets.random_set(tok, args.num_prompts, n_in, n_out)
        ignore_eos = True
    else:
        requests = datasets.sharegpt(lambda t: tok(t), args.num_prompts, max_output_len=args.max_output_len)
        ignore_eos = False
    prompts = [encode_chat(tok, r.prompt) for r in requests]
    # warm-up, measured nowhere
    engine.add_request("warm", prompts[0][:16], SamplingParams(max_tokens=4, temperature=0))
    while engine.has_work:
        engine.step()

    last = []
    schedule = engine.scheduler.schedule

    def recording():
        last[:] = schedule()
        return last

    engine.scheduler.schedule = recording
    pending = list(range(len(requests)))
    in_flight, out_tokens, steps = 0, 0, defaultdict(list)
    start = time.perf_counter()
    while pending or engine.has_work:
        while pending and in_flight < args.concurrency:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], SamplingParams(max_tokens=requests[i].output_len, temperature=0,
                                                                  ignore_eos=ignore_eos))
            in_flight += 1
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        tokens = sum(n for _, n in last)
        kind = "decode only" if tokens == len(last) else "with prefill"
        steps[kind].append((dt, tokens))
        for out in outputs:
            out_tokens += len(out.token_ids)
            if out.finish_reason is not None:
                in_flight -= 1
    duration = time.perf_counter() - start
    print(f"{len(requests)} requests, {sum(len(p) for p in prompts)} prompt tokens, {out_tokens} output tokens in "
          f"{duration:.1f} s: {out_tokens / duration:.1f} output tok/s")
    for kind, rows in steps.items():
        times = [t for t, _ in rows]
        toks = [n for _, n in rows]
        print(f"  {kind}: {len(rows)} steps, {sum(times):.1f} s, median {1000 * statistics.median(times):.0f} ms, "
              f"median {statistics.median(toks):.0f} tokens, {sum(toks) / sum(times):.0f} tok/s computed")


if __name__ == "__main__":
    main()
