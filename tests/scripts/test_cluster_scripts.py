"""The README's cluster scripts, run as a user runs them (issue 31).

* ``bash cluster/deploy_local.sh``: a private ``ray start --head``, ``serve deploy
  serve_config.yaml`` (the SmolLM2 demo), GET /v1/models, the base and two of the listed adapters
  answer; it must print ``deploy_local: OK``.
* ``bash cluster/multinode_local.sh`` in its shortened mode (``QUICK=1``: fewer models and
  repeats, same checks): two Ray nodes, the two LoRA replicas on different nodes, greedy texts
  equal PEFT's; it must print ``multinode_local: OK``.

Ports are free ones picked here (the scripts take them from the environment), so a developer's
own `serve run` on 8000 does not get in the way. Each script stops only what it started: no
process of its session may be left afterwards (conftest.run_command).
"""

from __future__ import annotations

import re

import pytest

from tests.scripts.conftest import free_port, run_command, script_env

pytestmark = pytest.mark.scripts


def test_deploy_local(log_dir):
    """The SmolLM2 demo cache is warm here in CI (the smollm2 tests built it earlier in the run);
    on a cold cache the deploy trains the tenants first, hence the long bound."""
    env = script_env(GCS_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()), HTTP_PORT=str(free_port()),
                     DASHBOARD_AGENT_PORT=str(free_port()), CLIENT_PORT=str(free_port()))
    run = run_command(["bash", "cluster/deploy_local.sh"], name="deploy_local", timeout=900, log_dir=log_dir, env=env)
    assert run.rc == 0 and "deploy_local: OK" in run.output, f"exit {run.rc}, log {run.log}\n{run.tail()}"
    m = re.search(r"GET /v1/models: base \['(.+?)'\], (\d+) adapters", run.output)
    assert m and int(m.group(2)) >= 2, run.tail()
    answered = re.findall(r"^(\S+) -> HTTP 200, x-served-by: lora, ", run.output, re.M)
    assert len(answered) == 3 and answered[0] == m.group(1), answered
    assert "stopped ray head pid" in run.output


def test_multinode_local_quick(log_dir):
    """Two nodes on this machine, the replicas on both, requests checked (and against PEFT)."""
    env = script_env(QUICK="1", GCS_PORT=str(free_port()), DASHBOARD_PORT=str(free_port()),
                     HTTP_PORT=str(free_port()), METRICS_A=str(free_port()), METRICS_B=str(free_port()),
                     AGENT_PORT_A=str(free_port()), AGENT_PORT_B=str(free_port()), CLIENT_PORT=str(free_port()))
    run = run_command(["bash", "cluster/multinode_local.sh"], name="multinode_local", timeout=420, log_dir=log_dir,
                      env=env)
    assert run.rc == 0 and "multinode_local: OK" in run.output, f"exit {run.rc}, log {run.log}\n{run.tail()}"
    assert "placement OK: LoRADeployment replicas on 2 distinct nodes ['node_a', 'node_b']" in run.output
    assert re.search(r"^requests OK: ", run.output, re.M) and re.search(r"^reference OK", run.output, re.M), \
        run.tail()
