"""Training: what changes the weights.

- ``em``: one-shot entropy minimization, one step read top to bottom (sample, mask, entropy, update).
- ``loss``: the entropy itself (per token, masked mean, chunked from hidden states).
- ``loss_pass``: the loss pass's forward and its speed machinery (compiled layers, shared prompt pass).
- ``optim``: AdamW and how its state fits the card (``train.optimizer``).
- ``reference``: the reference implementation's step, averaging and mask rules (``train.step_unit``, ...).
- ``rl``: GRPO with verifiable rewards, as a pipeline stage beside EM.
- ``objectives``: the label-free family (rewards, advantages, EM-INF).
- ``stopping``: a label-free stopping rule logged during training.
- ``distributed``: one run across a node's GPUs (FSDP2).
"""
