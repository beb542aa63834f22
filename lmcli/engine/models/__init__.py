"""Model classes by architecture, imported lazily. Qwen2 is Llama with q/k/v biases, Qwen3 Llama with a norm over
each head's query and key (config flags); Gemma 3 has a file of its own."""

import importlib

MODELS = {
    "LlamaForCausalLM": "lmcli.engine.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmcli.engine.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lmcli.engine.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "lmcli.engine.models.llama:LlamaForCausalLM",
    "Gemma3ForCausalLM": "lmcli.engine.models.gemma3:Gemma3ForCausalLM",
}


def model_class(architecture: str):
    module, name = MODELS[architecture].split(":")
    return getattr(importlib.import_module(module), name)
