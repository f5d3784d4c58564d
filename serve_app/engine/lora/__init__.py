"""Multi-adapter LoRA: many adapters served from one base model, any mix per step.

- ``weights.py``: read and validate a PEFT adapter folder into tensors (off the engine thread);
- ``manager.py``: the adapter pool (rows per projection kind), pinning, and the per-step batch
  (``prepare``: gathers, the path choice);
- ``slots.py``: the adapter-major slot buffers the per-row paths read;
- ``layers.py``: ``LoRALinear`` (the wrapped projections), ``LoRAContext`` and the batch types;
- ``kernels/``: one backend object per path (masked, loop, bmm, triton) and the cost model.
"""
