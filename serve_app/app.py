"""The one builder: validate args, bind the deployments. serve_config.yaml imports this.

Each deployment is bound with its own config object, which AppConfig builds: a replica reads
those settings, never the whole app config.

    serve run serve_app.app:build_app base_model=demo
    serve run serve_config.yaml
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppConfig
from serve_app.deployments.lora import LoRADeployment
from serve_app.deployments.merged import MergedDeployment
from serve_app.deployments.routing import EngineRequestRouter
from serve_app.router.ingress import Router


def _engine_deployment(cls: type, config: Any, *, replicas: int, num_cpus: float, num_gpus: float,
                       max_ongoing_requests: int) -> Application:
    """An engine deployment (LoRA or merged) bound to its config: Serve's options, a health
    check every 10 s, and the request router that pins stream channels (deployments/routing.py)."""
    return serve.deployment(
        cls,
        name=cls.__name__,
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        health_check_period_s=10,
        request_router_config=RequestRouterConfig(request_router_class=EngineRequestRouter),
    ).bind(config)


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = AppConfig.model_validate(args or {})
    cfg.engine_config("validate-only")  # fail here, at deploy time, on bad engine args
    if cfg.base_model == "smollm2":
        from serve_app.models.smollm2 import find_gguf

        find_gguf()  # fail at deploy time, with the install command, when the wheel is missing
    lora = _engine_deployment(
        LoRADeployment, cfg.lora_deployment_config(), replicas=cfg.lora_replicas, num_cpus=cfg.lora_num_cpus,
        num_gpus=cfg.lora_num_gpus, max_ongoing_requests=cfg.lora_max_ongoing_requests,
    )
    merged = None
    if cfg.merged:
        merged = _engine_deployment(
            MergedDeployment, cfg.merged_deployment_config(), replicas=cfg.merged_replicas,
            num_cpus=cfg.merged_num_cpus, num_gpus=cfg.merged_num_gpus,
            max_ongoing_requests=cfg.lora_max_ongoing_requests,
        )
    return serve.deployment(
        Router,
        name="Router",
        num_replicas=cfg.router_replicas,
        max_ongoing_requests=4 * cfg.lora_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.router_num_cpus},
    ).bind(lora, merged, cfg.router_config())
