"""``make demo``: train the demo config on every GPU, or on 2 CPU workers, in a fresh run directory."""

import subprocess
import sys
import time

import torch

name = time.strftime("demo-%Y%m%d-%H%M%S")
gpus = torch.cuda.device_count()
where = ["--gpus", str(gpus)] if gpus else ["--cpu", "--nproc", "2"]
command = [sys.executable, "-m", "launcher", "local", *where, "configs/demo.yaml", f"run.name={name}"]
print("$", " ".join(command), flush=True)
code = subprocess.call(command)
if code == 0:
    print(f"\nResults: runs/{name}/  (metrics.jsonl, checkpoints/best.pt and last.pt, logs/)\n"
          f"TensorBoard: {sys.executable} -m tensorboard.main --logdir runs/{name}/tensorboard")
sys.exit(code)
