"""Sent by tests/bench.py as CHECKPOINT_PY (python3 -c, in the lab hub):
take or restore the checkpoint of the bench job NAME through gridx.py's own
functions, as hub watch does.

  take NAME       take_checkpoint: PATH of the running container onto the hub
  restore NAME    checkpoint_image: the checkpoint laid on the job's image
                  (a layer, pushed to the hub's registry); prints the image
"""
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("gridx", "/opt/gridx/gridx.py")
gridx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gridx)
what, name = sys.argv[1], sys.argv[2]
service = gridx.list_job_services([name])[0]
if what == "take":
    nodes = gridx.all_swarm_nodes()
    task = next(t for t in gridx.list_tasks([service], nodes) if t.state == "running")
    node = next(n for n in nodes if n.id == task.node_id)
    got = gridx.take_checkpoint(service, task, node)
    if got["state"] != "collected":
        sys.exit(f"checkpoint not taken: {got}")
    print(got["bytes"])
else:
    print(gridx.checkpoint_image(service))
