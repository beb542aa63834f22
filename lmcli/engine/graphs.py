"""Decode steps replayed from CUDA graphs, one per batch-size bucket (as nano-vllm and vLLM do): a small model on a
big GPU spends a step launching kernels from Python (Llama-3.2-1B on an H200: 5.3 ms eager, 1.05 ms replayed).

A step of n decodes runs as the smallest bucket b >= n: the step's ids, positions, slots, lengths and block tables
are copied into the bucket's fixed tensors, rows n..b-1 are padding (slot -1: nothing stored; context 1 over block
0; their logits dropped), and the graph captured for b replays. The block table is as wide as the longest session,
so one graph serves every context length. The buckets are captured when the engine starts, largest first, into one
memory pool (captured as steps first needed them, the kernels' compilation and the captures landed in the first
requests' time: a small model's first 140 tokens took 7.4 s instead of 0.2). Steps with chunks of several tokens,
and batches past the largest bucket, run eagerly."""

import torch

from lmcli.engine.batch import Batch, build_batch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def buckets(max_seqs: int) -> list[int]:
    return [b for b in BUCKETS if b < max_seqs] + [max_seqs]


class DecodeGraphs:
    def __init__(self, runner, max_seqs: int, capture: bool = True):
        """capture=False runs the padded bucket eagerly (CPUs: the same inputs, no graph), for tests. The padding rows
        need the Triton backend's rotary_store, which skips slot -1."""
        self.runner, self.capture = runner, capture
        self.sizes = buckets(max_seqs)
        self.width = -(-runner.config.max_session_len // runner.block_size)
        self.steps = {}  # bucket -> (batch, graph or None, logits or None)
        self.pool = None

    def capture_all(self) -> None:
        for size in reversed(self.sizes):
            self._make(size)

    def fits(self, items: list[tuple]) -> bool:
        """Whether a step is all decodes, each sampled, and fits the largest bucket."""
        return 0 < len(items) <= self.sizes[-1] and all(len(item[0]) == 1 and item[3] for item in items)

    def run(self, items: list[tuple]) -> torch.Tensor:
        """The logits (len(items), vocab) of a step that fits, rows in the items' order."""
        n = len(items)
        size = next(b for b in self.sizes if b >= n)
        batch, graph, logits = self.steps.get(size) or self._make(size)
        host, _ = build_batch(items, self.runner.block_size)  # the step's own tensors, copied into the bucket's
        for name in ("input_ids", "positions", "context_lens"):
            getattr(batch, name)[:n].copy_(getattr(host, name), non_blocking=True)
        if n < size:
            batch.context_lens[n:].fill_(1)
        for g in range(1 + len(batch.groups)):  # each KV group's slots and tables
            fixed, step = batch.group(g), host.group(g)
            fixed.slot_mapping[:n].copy_(step.slot_mapping, non_blocking=True)
            # only the blocks the contexts use: the kernels read a row up to its context length, never past it
            fixed.block_tables[:n, :step.block_tables.shape[1]].copy_(step.block_tables, non_blocking=True)
            if n < size:  # padding rows, as at capture: nothing stored, one token of context in block 0
                fixed.slot_mapping[n:].fill_(-1)
                fixed.block_tables[n:, 0].zero_()
        if graph is None:
            return self.runner.forward(batch)[:n]
        graph.replay()
        return logits[:n]

    def _make(self, size: int) -> tuple:
        dev = self.runner.device
        zeros = dict(dtype=torch.long, device=dev)

        groups = [dict(slot_mapping=torch.full((size,), -1, **zeros),  # each KV group's slots and block tables
                       block_tables=torch.zeros(size, self.width, **zeros))
                  for _ in self.runner.config.model.kv_groups()]
        batch = Batch(input_ids=torch.zeros(size, **zeros), positions=torch.zeros(size, **zeros), num_decode=size,
                      context_lens=torch.ones(size, **zeros), cu_seqlens_q=torch.arange(size + 1, **zeros),
                      max_seqlen_q=1, prefills=[], sample_idx=torch.arange(size, **zeros),
                      groups=[dict(g, decode_block_tables=g["block_tables"], prefills=[]) for g in groups[1:]],
                      **groups[0])
        graph = logits = None
        if self.capture:
            self.runner.forward(batch)  # compiles the kernels outside the capture
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.runner.forward(batch)
            self.pool = graph.pool()
        self.steps[size] = (batch, graph, logits)
        return self.steps[size]
