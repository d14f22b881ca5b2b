"""Logs never depend on the swarm's log broker alone (issue 20).

The broker sometimes loses a node that stays Ready (moby#35011, #37336;
seen here on Docker 20.10 after a worker was killed and came back, and it
cannot be brought about at will): `docker service logs` then fails with
"incomplete log stream … node ID is not available". Here the hub's docker
CLI is made to answer exactly that for one job (a wrapper first on PATH,
naming the node its task ran on), so gridx must read that task from its
container on the worker, over the hub's SSH: `jobs logs`, `logs -f` and
`--wait` show the output and exit as the job did.
"""

import pytest
from e2e_helpers import hub, node_exec, ok

JOB = "e2e-broker"
# Docker's own words (26.1), for this job only; every other call is Docker's.
WRAPPER = r"""#!/bin/sh
case "$*" in
  *"service logs"*" e2e-broker"*)
      # the broker names the node of a placed task: wait until the swarm has
      # placed it (gridx's follower may ask before; Docker would not answer
      # "node  is not available" with no node)
      node= tries=0
      while [ -z "$node" ] && [ "$tries" -lt 240 ]; do
          task=$(/usr/bin/docker service ps -q --no-trunc e2e-broker | head -n 1)
          [ -z "$task" ] || node=$(/usr/bin/docker inspect --format '{{.NodeID}}' "$task")
          [ -n "$node" ] || sleep 0.25
          tries=$((tries + 1))
      done
      echo "error from daemon in stream: Error grabbing logs: rpc error: code = Unknown desc = warning:" \
           "incomplete log stream. some logs could not be retrieved for the following reasons:" \
           "node $node is not available" >&2
      exit 1 ;;
esac
exec /usr/bin/docker "$@"
"""


@pytest.fixture
def broken_broker(lab):
    ok(node_exec("hub", "cat > /usr/local/sbin/docker && chmod 755 /usr/local/sbin/docker", input=WRAPPER),
       "the wrapper")
    try:
        yield
    finally:
        node_exec("hub", "rm -f /usr/local/sbin/docker")
        hub("jobs", "delete", JOB)


def test_a_job_whose_node_the_broker_lost_is_read_from_its_container(broken_broker):
    waited = hub("jobs", "run", "--name", JOB, "--wait", "python:3.11",
                 "echo first line; echo second line; exit 3", timeout=300)
    assert waited.returncode == 3, waited.stderr  # as the job did
    assert "first line\nsecond line\n" in waited.stdout, (waited.stdout, waited.stderr)
    assert "incomplete log stream" not in waited.stderr
    # the wrapper does answer for it: the broker's stream really fails
    direct = node_exec("hub", f"docker service logs {JOB}")
    assert direct.returncode == 1 and "incomplete log stream" in direct.stderr
    for args in (["jobs", "logs", JOB], ["jobs", "logs", "-f", JOB]):
        proc = hub(*args, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "first line\nsecond line\n", (args, proc.stdout, proc.stderr)
        assert "incomplete log stream" not in proc.stderr
