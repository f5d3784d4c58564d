"""lm-eval, a client no one here wrote, against our server: loglikelihoods equal lm-eval's own ``hf``.

Starts the app on the W1 demo assets (tiny Llama, vocab 8192, 8 adapters) on a private Ray
instance, writes a small multiple-choice task from local files (benchmarks/lm_eval_task/mini.jsonl;
no hub), then for the base and two adapters runs, unchanged, in lm-eval's own venv:

* ``lm_eval --model local-completions`` against our /v1/completions (token-ID prompts, ``echo`` +
  ``logprobs=1`` + ``max_tokens=1``: our prompt logprobs);
* ``lm_eval --model hf`` with ``peft=<the adapter folder>`` on the same files (the reference).

and compares every (document, choice) loglikelihood from their ``--log_samples`` files, and the
accuracies. Both are told ``add_bos_token=True`` (lm-eval's two models default differently: hf
follows the tokenizer, which adds BOS here; local-completions adds none), so they score the same
token IDs. Fails (exit 1) if any differs by more than ``--tol`` or an accuracy differs.

    bash benchmarks/lm_eval_check.sh            # creates ~/.cache/serve_app/lmeval-venv once
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "serve_app_mini"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(assets) -> str:
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    repo = str(HERE.parent)
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"base_model": str(assets.base), "adapters": str(assets.adapters_dir), "base_model_name": "base",
                         "lora_num_cpus": 0.5, "router_num_cpus": 0.25, "torch_threads": 1}),
              name="lora-app", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the app did not become reachable")
        time.sleep(0.2)


def run_lm_eval(python: str, out: Path, task_dir: Path, model: str, model_args: str, log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # lm-eval's venv: nothing of ours
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [python, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(task_dir), "--batch_size", "1", "--log_samples", "--output_path", str(out),
           "--seed", "0", *(["--device", "cpu"] if model == "hf" else [])]
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"lm_eval failed ({r.returncode}); see {log}:\n" + log.read_text()[-3000:])


def read_samples(out: Path) -> dict[tuple[int, int], float]:
    files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    assert files, f"no samples file under {out}"
    lls = {}
    for line in files[-1].read_text().splitlines():
        s = json.loads(line)
        for j, resp in enumerate(s["resps"]):
            lls[(s["doc_id"], j)] = float(resp[0][0])
    return lls


def read_acc(out: Path) -> float:
    files = sorted(out.rglob("results_*.json"))
    res = json.loads(files[-1].read_text())["results"][TASK]
    return next(v for k, v in res.items() if k.startswith("acc,"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lmeval-python", default=str(Path.home() / ".cache/serve_app/lmeval-venv/bin/python"))
    ap.add_argument("--models", default="base,tenant-0,tenant-1")
    ap.add_argument("--out", default="/tmp/serve_app_lm_eval")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |loglikelihood difference| per (doc, choice)")
    args = ap.parse_args()

    from serve_app.demo import build_demo_assets

    assets = build_demo_assets()
    out = Path(args.out)
    task_dir = out / "task"
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=HERE / "lm_eval_task" / "mini.jsonl"))
    url = start_server(assets)
    rows, ok = [], True
    try:
        for model in args.models.split(","):
            ours, ref = out / f"ours-{model}", out / f"hf-{model}"
            run_lm_eval(args.lmeval_python, ours, task_dir, "local-completions",
                        f"model={model},base_url={url}/v1/completions,tokenizer={assets.base},"
                        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,add_bos_token=True",
                        out / f"ours-{model}.log")
            peft = "" if model == "base" else f",peft={assets.adapters_dir / model}"
            run_lm_eval(args.lmeval_python, ref, task_dir, "hf",
                        f"pretrained={assets.base}{peft},dtype=float32,add_bos_token=True", out / f"hf-{model}.log")
            a, b = read_samples(ours), read_samples(ref)
            assert a.keys() == b.keys(), (model, sorted(set(a) ^ set(b))[:5])
            diff = max(abs(a[k] - b[k]) for k in a)
            acc_a, acc_b = read_acc(ours), read_acc(ref)
            good = diff <= args.tol and acc_a == acc_b
            ok &= good
            rows.append((model, len(a), acc_a, acc_b, diff, good))
    finally:
        from ray import serve
        import ray

        serve.shutdown()
        ray.shutdown()
    print(f"== lm_eval_check: task {TASK} ({HERE / 'lm_eval_task' / 'mini.jsonl'}), W1 demo model; tol {args.tol}")
    print(f"  {'model':<10} {'loglik':>6} {'acc ours':>9} {'acc hf':>7} {'max |d loglik|':>15}")
    for model, n, acc_a, acc_b, diff, good in rows:
        print(f"  {model:<10} {n:>6} {acc_a:>9.3f} {acc_b:>7.3f} {diff:>15.2e}  {'OK' if good else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
