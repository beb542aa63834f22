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
    decode_mask: torch.Tensor  # (num_decode, 1, 1, max_blocks * block_size): True where a key is in context
    prefills: list  # [(start, length, context, block_table)] for sequences computing several tokens
    sample_idx: torch.Tensor  # (samples,): the tokens whose logits are needed, in sampling order


def build_batch(scheduled: list, block_size: int, device="cpu") -> tuple[Batch, list]:
    """scheduled: [(sequence, tokens to compute)]. Returns the batch and the sequences to sample, in order."""
    decodes = [(s, n) for s, n in scheduled if n == 1]
    prefills = [(s, n) for s, n in scheduled if n > 1]
    ids, positions, slots, chunks, sample_idx, to_sample = [], [], [], [], [], []
    for seq, n in decodes + prefills:
        start, c = len(ids), seq.num_computed
        ids += seq.token_ids[c:c + n]
        positions += range(c, c + n)
        table = seq.block_table
        slots += [table[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        if n > 1:
            chunks.append((start, n, c + n, torch.tensor(table[:-(-(c + n) // block_size)], device=device)))
        if c + n == seq.num_tokens:
            sample_idx.append(len(ids) - 1)
            to_sample.append(seq)
    nd = len(decodes)
    width = max((len(s.block_table) for s, _ in decodes), default=0)
    tables = torch.zeros(nd, width, dtype=torch.long)
    mask = torch.zeros(nd, 1, 1, width * block_size, dtype=torch.bool)
    for i, (seq, _) in enumerate(decodes):
        tables[i, :len(seq.block_table)] = torch.tensor(seq.block_table)
        mask[i, ..., :seq.num_computed + 1] = True
    as_long = dict(dtype=torch.long, device=device)
    batch = Batch(input_ids=torch.tensor(ids, **as_long), positions=torch.tensor(positions, **as_long),
                  slot_mapping=torch.tensor(slots, **as_long), num_decode=nd, decode_block_tables=tables.to(device),
                  decode_mask=mask.to(device), prefills=chunks, sample_idx=torch.tensor(sample_idx, **as_long))
    return batch, to_sample
