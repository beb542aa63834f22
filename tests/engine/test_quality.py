"""`lm bench quality`: perplexity through our engine (checked against transformers' own forward pass) and greedy
agreement with float32, on the real SmolLM2 workspace (converted in float32: the Q4_1 GGUF exactly)."""

import json

import torch

from conftest import assert_one_line_error, hf_model_from_workspace, run_lm
from lmcli.bench import quality
from lmcli.engine.engine import Engine
from lmcli.workspace import Workspace

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from wine making. ") * 3


def test_token_logprobs_are_transformers_log_likelihoods(smollm2_workspace):
    """Every position's next-token log-probability, one prompt of 100+ tokens over two KV blocks of 64."""
    engine = Engine(smollm2_workspace, dtype="float32", num_blocks=8, enable_prefix_caching=False)
    try:
        ids = engine.tokenizer.encode(TEXT)
        assert len(ids) > 64
        ours = quality.token_logprobs(engine, ids)
        ppl = quality.perplexity(engine, [TEXT], 1000)
    finally:
        engine.close()
    model = hf_model_from_workspace(Workspace.load(smollm2_workspace))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    theirs = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)
    assert abs(ppl / float(torch.exp(-theirs.mean())) - 1) < 1e-3


def test_agreement_counts_tokens_up_to_the_first_difference():
    share, whole = quality.agreement([[1, 2, 3, 4], [1, 9, 3, 4], [5, 6, 7, 8]], [[1, 2, 3, 4], [1, 2, 3, 4],
                                                                                 [1, 6, 7, 8]])
    assert (share, whole) == ((1 + 0.25 + 0) / 3, 1)


def test_bench_quality_prints_each_format_beside_float32(smollm2_workspace, smollm2_int4_workspace, tmp_path):
    """--formats on one workspace, and --also another (the GGUF's own 4-bit blocks) against the same float32."""
    conversations = [{"conversations": [{"from": "human", "value": f"Tell me about the number {i}."},
                                        {"from": "gpt", "value": TEXT}]} for i in range(3)]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(conversations))
    done = run_lm("bench", "quality", smollm2_workspace, "--formats", "bfloat16,int4", "--num-texts", "2",
                  "--text-len", "48", "--num-prompts", "2", "--gen-len", "6", "--dataset-path", data,
                  "--also", smollm2_int4_workspace)
    assert done.returncode == 0, done.stderr
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in done.stdout.splitlines()
             if line.startswith("│")]
    rows = {c[0]: c for c in cells if c[0] in quality.FORMATS}
    assert list(rows) == ["float32", "bfloat16", "int4"]
    assert rows["float32"][2:] == ["+0.00%", "100.0%", "2/2"]
    rows["kept"] = next(c for c in cells if c[0] == f"{smollm2_int4_workspace.name} (--also)")
    for name in ("bfloat16", "int4", "kept"):  # a perplexity near float32's: the model works in that format
        assert abs(float(rows[name][1]) / float(rows["float32"][1]) - 1) < 0.2
    assert_one_line_error(run_lm("bench", "quality", smollm2_workspace, "--formats", "int3"), "unknown format 'int3'")
