"""Generation: responses from a model, shared by training and evaluation.

- ``sample``: sampling settings, the generation backend's choice (``auto``, ``hf``, ``static*``,
  ``continuous*``) and the masks that say which tokens the model generated.
- ``decode``: the static-cache decoders (static batches, continuous batching).
- ``vllm_backend``: optional vLLM generation for evaluation.
"""
