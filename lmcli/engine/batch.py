"""One step's inputs in tensors: built by the model runner, passed to the model's forward."""

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (tokens,): decode tokens first, then each prefill chunk
    positions: torch.Tensor  # (tokens,)
    slot_mapping: torch.Tensor  # (tokens,): where each token's K/V go, block_id * block_size + offset
    num_decode: int  # sequences computing one token; they come first
    decode_block_tables: torch.Tensor  # (num_decode, max_blocks), padded with block 0
    decode_lens: torch.Tensor  # (num_decode,): each decode's context length, its new token included
    prefills: list  # [(start, length, context, block_table)] for sequences computing several tokens
    sample_idx: torch.Tensor  # (samples,): the tokens whose logits are needed, in sampling order


def plan(scheduled: list) -> list[tuple]:
    """[(sequence, tokens to compute)] -> [(new token ids, tokens already computed, block table, sample?)]: all a
    rank needs to run the step (tensor-parallel workers receive this)."""
    return [(s.token_ids[s.num_computed:s.num_computed + n], s.num_computed, s.block_table,
             s.num_computed + n == s.num_tokens) for s, n in scheduled]


def build_batch(items: list[tuple], block_size: int, device="cpu") -> tuple[Batch, list[int]]:
    """Tensors for the planned items; also which items are sampled, in the order of the logits' rows."""
    order = [i for i, item in enumerate(items) if len(item[0]) == 1] + \
            [i for i, item in enumerate(items) if len(item[0]) > 1]
    ids, positions, slots, chunks, sample_idx, sampled = [], [], [], [], [], []
    nd = sum(len(item[0]) == 1 for item in items)
    for i in order:
        new, c, table, want = items[i]
        n, start = len(new), len(ids)
        ids += new
        positions += range(c, c + n)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        if n > 1:
            chunks.append((start, n, c + n, torch.tensor(table[:-(-(c + n) // block_size)], device=device)))
        if want:
            sample_idx.append(len(ids) - 1)
            sampled.append(i)
    decodes = [items[i] for i in order[:nd]]
    width = max((len(table) for _, _, table, _ in decodes), default=0)
    tables = torch.tensor([table + [0] * (width - len(table)) for _, _, table, _ in decodes],
                          dtype=torch.long).view(nd, width)
    as_long = dict(dtype=torch.long, device=device)
    batch = Batch(input_ids=torch.tensor(ids, **as_long), positions=torch.tensor(positions, **as_long),
                  slot_mapping=torch.tensor(slots, **as_long), num_decode=nd, decode_block_tables=tables.to(device),
                  prefills=chunks,
                  decode_lens=torch.tensor([c + 1 for _, c, _, _ in decodes], **as_long),
                  sample_idx=torch.tensor(sample_idx, **as_long))
    return batch, sampled
