"""Generation: responses from a model, shared by training and evaluation.

- ``sample``: sampling settings, the backend choice (``static``, ``continuous``, ``hf``, ``vllm``) and the
  masks that say which tokens the model generated.
- ``decode``: the static-cache decoders (static batches, continuous batching).
- ``vllm_backend``: optional vLLM generation for evaluation.
"""
