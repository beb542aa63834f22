"""The inference engine: paged KV cache, continuous batching, prefix caching, sessions, tensor parallelism.
It knows nothing about HTTP."""
