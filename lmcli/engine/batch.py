"""One step's inputs in tensors: built by the model runner, passed to the model's forward. Device-neutral: flat
tensors for the whole step (one padded block table, cumulative query lengths, context lengths), which the attention
backends read as they are or derive what their kernels need from (Batch.prefills for the CPU's chunk kernels)."""

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (tokens,): decode tokens first, then each prefill chunk
    positions: torch.Tensor  # (tokens,)
    slot_mapping: torch.Tensor  # (tokens,): where each token's K/V go, block_id * block_size + offset
    num_decode: int  # sequences computing one token; they come first
    block_tables: torch.Tensor  # (seqs, max_blocks) int64, padded with block 0; in the tokens' order
    context_lens: torch.Tensor  # (seqs,) int64: each sequence's context length, its new tokens included
    cu_seqlens_q: torch.Tensor  # (seqs + 1,) int64: sequence i's tokens are [cu_seqlens_q[i], cu_seqlens_q[i + 1])
    max_seqlen_q: int  # the most new tokens of one sequence
    prefills: list  # [(start, length, context, block_table)] for the sequences computing several tokens
    sample_idx: torch.Tensor  # (samples,): the tokens whose logits are needed, in sampling order
    # (num_decode, the decodes' most blocks): as wide as the decodes need, not as a long chunk's table (the PyTorch
    # decode reads every column); default: the block table's first rows
    decode_block_tables: torch.Tensor = None
    max_context: int = 0  # the longest context_lens entry (known without reading the tensor: no device sync)
    backend: Any = None  # the attention backend (lmcli.kernels.backend), set by the model runner
    meta: dict = field(default_factory=dict)  # what the backend's prepare() derived for its kernels
    # the other KV groups' slot_mapping, block_tables, decode_block_tables and prefills (ModelConfig.kv_groups)
    groups: list = field(default_factory=list)
    views: dict = field(default_factory=dict)  # group -> this batch as that group's layers see it (group())

    def __post_init__(self):
        if self.decode_block_tables is None and self.block_tables is not None:
            self.decode_block_tables = self.block_tables[:self.num_decode]

    def group(self, g: int) -> "Batch":
        """The batch for the layers of KV group g: its own slots and block tables, all else shared."""
        if g == 0:
            return self
        view = self.views.get(g)
        if view is None:
            view = self.views[g] = replace(self, **self.groups[g - 1], groups=[], views={})
        view.backend = self.backend  # set per step (the graphs' fixed batches are reused)
        return view

    @property
    def decode_lens(self) -> torch.Tensor:  # (num_decode,)
        return self.context_lens[:self.num_decode]


def plan(scheduled: list) -> list[tuple]:
    """[(sequence, tokens to compute)] -> [(new token ids, tokens already computed, block table, sample?, the other
    KV groups' block tables)]: all a rank needs to run the step (tensor-parallel workers receive this)."""
    return [(s.token_ids[s.num_computed:s.num_computed + n], s.num_computed, s.block_table,
             s.num_computed + n == s.num_tokens, s.tables[1:]) for s, n in scheduled]


def _group(items: list[tuple], order: list[int], nd: int, block_size: int, cu: list[int], contexts: list[int],
           device, group: int) -> dict:
    """One KV group's tensors for the step: slot mapping, padded block tables, the decodes' tables, the chunks."""
    slots, tables = [], []
    for i, context in zip(order, contexts):
        new, c, table, *rest = items[i]
        table = table if group == 0 else rest[1][group - 1]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, context)]
        tables.append(table[:-(-context // block_size)])
    width = max(map(len, tables), default=0)
    as_long = dict(dtype=torch.long, device=device)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], **as_long).view(len(tables), width)
    decode_width = max(map(len, tables[:nd]), default=0)
    decode_tables = block_tables[:nd] if decode_width == width else torch.tensor(
        [t + [0] * (decode_width - len(t)) for t in tables[:nd]], **as_long).view(nd, decode_width)
    return dict(slot_mapping=torch.tensor(slots, **as_long), block_tables=block_tables,
                decode_block_tables=decode_tables,
                prefills=[(cu[j], cu[j + 1] - cu[j], contexts[j], block_tables[j, :len(tables[j])])
                          for j in range(nd, len(order))])


def build_batch(items: list[tuple], block_size: int, device="cpu") -> tuple[Batch, list[int]]:
    """Tensors for the planned items (see plan; the other groups' tables may be left out where there are none); also
    which items are sampled, in the order of the logits' rows."""
    order = [i for i, item in enumerate(items) if len(item[0]) == 1] + \
            [i for i, item in enumerate(items) if len(item[0]) > 1]
    ids, positions, sample_idx, sampled, cu, contexts = [], [], [], [], [0], []
    for i in order:
        new, c, _, want, *_ = items[i]
        ids += new
        positions += range(c, c + len(new))
        cu.append(len(ids))
        contexts.append(c + len(new))
        if want:
            sample_idx.append(len(ids) - 1)
            sampled.append(i)
    nd = sum(len(item[0]) == 1 for item in items)
    num_groups = 1 + max((len(item[4]) for item in items if len(item) > 4), default=0)
    groups = [_group(items, order, nd, block_size, cu, contexts, device, g) for g in range(num_groups)]
    as_long = dict(dtype=torch.long, device=device)
    batch = Batch(input_ids=torch.tensor(ids, **as_long), positions=torch.tensor(positions, **as_long),
                  num_decode=nd, context_lens=torch.tensor(contexts, **as_long),
                  cu_seqlens_q=torch.tensor(cu, **as_long),
                  max_seqlen_q=max((cu[j + 1] - cu[j] for j in range(len(order))), default=0),
                  max_context=max(contexts, default=0), sample_idx=torch.tensor(sample_idx, **as_long),
                  groups=groups[1:], **groups[0])
    return batch, sampled
