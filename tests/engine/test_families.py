"""Each model family the workspace takes, end to end: a small random model written by transformers'
save_pretrained (or as a GGUF, as llama.cpp's converter writes one), converted with `lm convert` to the model's
own weights, run by the engine; its greedy tokens must be transformers' own
(float32, prompts of a few lengths, some past a KV block, decoded together; Qwen3 also over two
tensor-parallel ranks, whose heads share the query and key norms; Mistral with a sliding window the prompts
outgrow; Gemma 3 with sliding-window layers between full-attention ones, also over two ranks)."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, \
    MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lmcli.engine.engine import Engine
from lmcli.engine.sampling_params import SamplingParams
from lmcli.workspace import Workspace
from conftest import run_lm, unfuse
from gguf_writer import same_weights, write_gguf

NEW_TOKENS = 12
SMALL = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # short: the prompts reach past it
FAMILIES = {
    # Qwen3: a norm over each head's query and key, head_dim set apart from hidden / heads
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True, rope_theta=1e6)),
    "llama3.x": (LlamaForCausalLM, LlamaConfig(**SMALL, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})),
    # Mistral: every layer a sliding window, which the longer prompts outgrow (and all of them as they decode)
    "mistral": (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=32)),
    # Qwen2 with its window on: the first max_window_layers layers keep full attention
    "qwen2-window": (Qwen2ForCausalLM, Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=32,
                                                   max_window_layers=1)),
    # Gemma 3: sliding-window layers (rope theta 10000) and full-attention ones (1e6, linear rope scaling), an
    # attention scale apart from head_dim ** -0.5, its own norms (random: see test below), GeGLU, scaled embeddings
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 4}, head_dim=32, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
}
# What a family's GGUF can say, where it says less than the family's config: llama.cpp's gemma3 has no layer types
# (every 6th layer full attention), no local rope theta (10000) and no query_pre_attn_scalar (head_dim)
GGUF_CONFIGS = {"gemma3": Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 6}, head_dim=32, sliding_window=32,
                                           query_pre_attn_scalar=32)}


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_workspace):
    return Workspace.load(smollm2_workspace).tokenizer_path


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 70, 150)]


@pytest.mark.parametrize("family,tp,source", [(name, 1, "hf") for name in FAMILIES]
                         + [("qwen3", 2, "hf"), ("gemma3", 2, "hf")]
                         + [(name, 1, "gguf") for name in FAMILIES if name not in ("mistral", "qwen2-window")])
def test_greedy_tokens_are_transformers(family, tp, source, tmp_path, tokenizer_dir, smollm2_gguf):
    """source gguf: the model written as llama.cpp's converter would (Llama 3's rope scaling as its rope_freqs)."""
    from transformers import AutoTokenizer

    model_cls, config = FAMILIES[family]
    if source == "gguf":
        config = GGUF_CONFIGS.get(family, config)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at ones: random ones tell a swapped or misplaced norm apart
        for name, p in model.named_parameters():
            if "norm" in name and family == "gemma3":  # Gemma's scale by 1 + weight; bfloat16's 8 bits: 1 + w exact
                p.copy_((torch.randn_like(p) * 0.1).bfloat16())
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    if source == "hf":
        model.save_pretrained(tmp_path / "hf")
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "hf")
    else:
        write_gguf(tmp_path / "m.gguf", {"qwen3": "qwen3", "llama3.x": "llama", "gemma3": "gemma3"}[family], model,
                   smollm2_gguf)
    done = run_lm("convert", tmp_path / ("hf" if source == "hf" else "m.gguf"), "--dst-path", tmp_path / "ws")
    assert done.returncode == 0, done.stderr
    same_weights(unfuse(Workspace.load(tmp_path / "ws")), model)

    theirs = []
    with torch.inference_mode():
        for ids in prompts():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            theirs.append((out.sequences[0, len(ids):].tolist(), torch.stack(out.logits)[:, 0]))

    engine = Engine(tmp_path / "ws", dtype="float32", cache_block_seq_len=64, tp=tp)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = {}
    for i, ids in enumerate(prompts()):
        engine.add_request(str(i), ids, params)
    try:
        while engine.has_work:
            for o in engine.step():
                outputs.setdefault(o.request_id, []).extend(o.token_ids)
    finally:
        engine.close()
    for i, (tokens, logits) in enumerate(theirs):
        mine = outputs[str(i)]
        assert len(mine) == len(tokens) == NEW_TOKENS
        if mine != tokens:  # only where transformers' own top two were a near-tie
            j = next(k for k, (a, b) in enumerate(zip(mine, tokens)) if a != b)
            top2 = logits[j].topk(2).values
            assert (top2[0] - top2[1]).item() < 1e-4, f"{family}: prompt {i} differs at token {j}: {mine} {tokens}"
