"""Checks for cluster/multinode_local.sh, once the app is RUNNING on a two-node local cluster.

1. Placement, through Ray's state API (the dashboard's HTTP API; no ray.init needed): the
   LoRADeployment replicas are ALIVE on distinct node IDs, one on the node with custom
   resource ``node_a`` (the head) and one on the node with ``node_b``.
2. Requests across tenants (the base model and several tenant-N adapters), each sent several
   times, concurrently: HTTP 200, ``x-served-by: lora``, and at temperature 0 with
   ``ignore_eos`` the identical text on every repeat.
3. (Unless --no-reference) those texts equal a plain PEFT greedy reference computed in this
   process from the same demo files the replicas load.
4. Informational: each node's Prometheus endpoint, to show which node's replica took requests.

Exit status 0 when 1-3 hold; prints one line per finding.

    python cluster/multinode_check.py --dashboard http://127.0.0.1:8276 --http http://127.0.0.1:8001 \
        --config cluster/serve_config.multinode.yaml --metrics 127.0.0.1:8091,127.0.0.1:8092
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

PROMPTS = ["the quick brown", "a router sends the request to"]
MAX_TOKENS = 8
REPEATS = 3


def post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, str], dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


def check_placement(dashboard: str, app_name: str) -> list[str]:
    from ray.util.state import list_actors, list_nodes

    errors: list[str] = []
    nodes = list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], detail=True)
    label = {}  # node_id -> "node_a" / "node_b"
    for n in nodes:
        res = n.resources_total or {}
        tag = next((t for t in ("node_a", "node_b") if t in res), "?")
        label[n.node_id] = tag
        print(f"node {n.node_id[:12]} {tag:6} head={n.is_head_node} CPU={res.get('CPU')}")
    if sorted(label.values()) != ["node_a", "node_b"]:
        errors.append(f"expected 2 alive nodes tagged node_a and node_b, got {sorted(label.values())}")

    for deployment in ("LoRADeployment", "Router"):
        actors = list_actors(
            address=dashboard,
            filters=[("class_name", "=", f"ServeReplica:{app_name}:{deployment}"), ("state", "=", "ALIVE")],
            detail=True,
        )
        where = [label.get(a.node_id, a.node_id) for a in actors]
        for a in actors:
            print(f"{deployment} replica actor {a.actor_id[:12]} pid={a.pid} on node {a.node_id[:12]} "
                  f"({label.get(a.node_id, '?')})")
        if deployment == "LoRADeployment":
            node_ids = {a.node_id for a in actors}
            if len(actors) != 2:
                errors.append(f"expected 2 ALIVE LoRADeployment replicas, got {len(actors)}")
            elif len(node_ids) != 2:
                errors.append(f"both LoRADeployment replicas are on one node: {where}")
            elif sorted(where) != ["node_a", "node_b"]:
                errors.append(f"LoRADeployment replicas on unexpected nodes: {where}")
            else:
                print(f"placement OK: LoRADeployment replicas on 2 distinct nodes {sorted(where)}")
    return errors


def check_requests(http: str, models: list[str]) -> tuple[list[str], dict[tuple[str, str], str]]:
    errors: list[str] = []
    jobs = [(m, p) for m in models for p in PROMPTS for _ in range(REPEATS)]

    def one(job):
        m, p = job
        body = {"model": m, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        return job, post(http + "/v1/completions", body)

    texts: dict[tuple[str, str], set[str]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent: mixed tenants in one batch
        for (m, p), (code, headers, out) in pool.map(one, jobs):
            served = headers.get("x-served-by")
            if code != 200 or served != "lora":
                errors.append(f"{m} {p!r}: HTTP {code}, x-served-by={served}, {out}")
                continue
            choice = out["choices"][0]
            if choice.get("finish_reason") != "length" or out["usage"]["completion_tokens"] != MAX_TOKENS:
                errors.append(f"{m} {p!r}: expected {MAX_TOKENS} tokens / finish_reason length, got {out}")
            texts.setdefault((m, p), set()).add(choice["text"])
    for (m, p), seen in sorted(texts.items()):
        if len(seen) != 1:
            errors.append(f"{m} {p!r}: temperature 0 gave {len(seen)} different texts over {REPEATS} repeats: {seen}")
        print(f"{m:9} {p!r:34} -> {sorted(seen)[0]!r}" + ("" if len(seen) == 1 else f"  (+{len(seen) - 1} other)"))
    if not errors:
        print(f"requests OK: {len(jobs)} requests, {len(models)} models x {len(PROMPTS)} prompts x {REPEATS} repeats, "
              "all 200 + x-served-by: lora, identical greedy text per (model, prompt)")
    return errors, {k: sorted(v)[0] for k, v in texts.items()}


def check_reference(args: dict[str, Any], texts: dict[tuple[str, str], str]) -> list[str]:
    """Plain transformers + PEFT greedy decoding, in this process, on the replicas' demo files."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable(logging.WARNING)  # e.g. bitsandbytes' optional-kernel notice on import
    warnings.simplefilter("ignore")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from serve_app.config import AppConfig

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    cfg = AppConfig.model_validate(args)
    base_dir, adapters_dir = cfg.resolve_paths()  # a cache hit: the replicas built it already
    tok = AutoTokenizer.from_pretrained(base_dir)
    errors = []
    for model in sorted({m for m, _ in texts}):
        net = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        if model != cfg.base_model_name:
            net = PeftModel.from_pretrained(net, os.path.join(adapters_dir, model)).eval()
        for prompt in PROMPTS:
            if (model, prompt) not in texts:
                continue
            ids = tok(prompt)["input_ids"]
            with torch.inference_mode():
                out = net(input_ids=torch.tensor([ids]), use_cache=True)
                new = []
                for _ in range(MAX_TOKENS):
                    new.append(int(out.logits[0, -1].argmax()))
                    out = net(input_ids=torch.tensor([[new[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            want = tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if texts[(model, prompt)] != want:
                errors.append(f"{model} {prompt!r}: served {texts[(model, prompt)]!r}, PEFT reference {want!r}")
    if not errors:
        print(f"reference OK: all {len(texts)} served texts equal plain PEFT greedy decoding")
    return errors


def report_metrics(endpoints: list[str], wait_s: float = 30) -> None:
    """Per-replica LoRADeployment request counts from each node's Prometheus endpoint. Replicas
    push metrics to their node's agent every few seconds, so poll a little before reporting."""
    pat = re.compile(r'^ray_serve_deployment_request_counter(?:_total)?\{([^}]*)\}\s+(\S+)', re.M)
    builtin = re.compile(r"^(ray_serve_(?:num_router_requests|multiplexed_models_(?:un)?load_counter)\w*)", re.M)
    deadline = time.monotonic() + wait_s
    while True:
        found = {}
        for ep in endpoints:
            try:
                text = urllib.request.urlopen(f"http://{ep}/metrics", timeout=10).read().decode()
            except OSError as e:
                found[ep] = (None, f"unreachable ({e})", [])
                continue
            counts = {}
            for labels, value in pat.findall(text):
                if 'deployment="LoRADeployment"' in labels:
                    replica = re.search(r'replica="([^"]*)"', labels)
                    counts[replica.group(1) if replica else "?"] = float(value)
            found[ep] = (counts, f"{len(re.findall(r'^ray_serve_', text, re.M))} ray_serve_* samples",
                         sorted(set(builtin.findall(text))))
        if all(c for c, _, _ in found.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    for ep, (counts, note, names) in found.items():
        print(f"metrics {ep}: LoRADeployment requests per replica {counts or '(none exported yet)'}; {note}; "
              f"built-ins seen: {names or 'none'}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--http", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--models", type=int, default=5, help="how many tenant-N adapters besides the base")
    ap.add_argument("--repeats", type=int, default=REPEATS, help="times each (model, prompt) is sent")
    ap.add_argument("--metrics", default="", help="comma-separated host:port Prometheus endpoints (informational)")
    ap.add_argument("--no-reference", action="store_true")
    a = ap.parse_args()
    globals()["REPEATS"] = a.repeats  # check_requests' repeats

    app = yaml.safe_load(open(a.config))["applications"][0]
    args = app.get("args") or {}
    models = [args.get("base_model_name", "base")] + [f"tenant-{i}" for i in range(a.models)]

    errors = check_placement(a.dashboard, app["name"])
    req_errors, texts = check_requests(a.http, models)
    errors += req_errors
    if not a.no_reference and texts:
        errors += check_reference(args, texts)
    if a.metrics:
        report_metrics([e for e in a.metrics.split(",") if e])
    for e in errors:
        print("ERROR:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
