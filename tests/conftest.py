import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcli.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
LM = Path(sys.executable).parent / "lm"  # the console script pip installed beside this Python


def run_lm(*args, env=None, cwd=None, timeout=300, input=None) -> subprocess.CompletedProcess:
    """Run the real `lm` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(LM), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout, input=input)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert done.returncode != 0, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def unfuse(ws: Workspace) -> dict:
    """The workspace's weights under Hugging Face names, fused tensors split back."""
    c, out = ws.config, {}
    for name, t in ws.weights():
        if ".qkv_proj." in name:  # weight or bias
            q, k, v = t.split([c.q_size, c.kv_size, c.kv_size])
            out.update({name.replace("qkv_proj", "q_proj"): q, name.replace("qkv_proj", "k_proj"): k,
                        name.replace("qkv_proj", "v_proj"): v})
        elif name.endswith("gate_up_proj.weight"):
            gate, up = t.chunk(2)
            out.update({name.replace("gate_up_proj", "gate_proj"): gate, name.replace("gate_up_proj", "up_proj"): up})
        else:
            out[name] = t
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, fetched once per machine into the user's cache."""
    from lmcli.known_models import DEFAULT_MODEL, fetch

    return fetch(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_workspace(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted by the real `lm convert` command, once per test session."""
    dst = tmp_path_factory.mktemp("ws") / "smollm2"
    done = run_lm("convert", smollm2_gguf, "--dst-path", dst, "--model-name", "SmolLM2-135M-Instruct")
    assert done.returncode == 0, done.stderr
    return dst


def hf_model_from_workspace(ws: Workspace):
    """transformers' own implementation with the workspace's weights: the oracle for the engine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = ws.config
    cls, config_cls = (Qwen2ForCausalLM, Qwen2Config) if c.family == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    config = config_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                        rope_parameters={"rope_theta": c.rope_theta, "rope_type": "default", **(c.rope_scaling or {})},
                        attention_bias=c.qkv_bias)
    model = cls(config).to(getattr(torch, ws.dtype)).eval()
    missing, unexpected = model.load_state_dict(unfuse(ws), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model
