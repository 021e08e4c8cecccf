"""DeepSpeed on CPU starts without JIT-compiling its shared-memory comm op (worker.skip_shm_comm_build)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, socket, sys, time
    import torch, torch.distributed as dist
    import deepspeed, deepspeed.ops
    from searche1_ray.training.worker import skip_shm_comm_build

    # without the skip DeepSpeed would build it: the probe must say the op is buildable here
    assert deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm") is True, "probe changed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    skip_shm_comm_build()
    t0 = time.time()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    from deepspeed import comm
    print("shm_op", comm.comm.cdb.shm_comm_op, "init_s", round(time.time() - t0, 1))
    t = torch.ones(4)
    comm.all_reduce(t)                       # training collectives still work (gloo)
    print("sum", float(t.sum()))
    dist.destroy_process_group()
""")


def test_deepspeed_cpu_init_builds_no_shm_op(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "shm_op None" in out.stdout, out.stdout
    assert "sum 4.0" in out.stdout
    built = list((tmp_path / "ext").rglob("*")) if (tmp_path / "ext").exists() else []
    assert not built, f"DeepSpeed compiled something: {built[:5]}"
