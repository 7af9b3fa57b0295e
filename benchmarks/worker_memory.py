"""What one data worker process costs in memory, and why: its resident set against what it imports.

Each row is a fresh `python` process (spawned, as multiprocessing's `spawn` starts the data workers) that
imports a set of modules and reports its resident set (`VmRSS` of `/proc/self/status`) and whether JAX got
imported. The last rows are real data workers: a `TrainPipeline` over a small folder of PNGs with
`--workers` workers (`cait_eqx.data._workers.WorkerPool`), read for a few batches with DeiT's
`TrainTransform`, each worker's `VmRSS` read from `/proc/<pid>/status` and whether JAX's shared library is
mapped into it (`/proc/<pid>/maps`).

Run `python benchmarks/worker_memory.py`; the results are in `benchmarks/README.md` ("Data pipeline").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

# name: (modules imported, environment added)
IMPORTS = {
    "python, numpy, PIL": ("numpy,PIL.Image", {}),
    "+ jaxtyping": ("numpy,PIL.Image,jaxtyping", {}),
    "+ cait_eqx's data modules, checking off": (
        "numpy,PIL.Image,jaxtyping,cait_eqx.data._pipeline,cait_eqx.data._transforms",
        {"CAIT_EQX_TYPECHECK": "0"},
    ),
    "+ cait_eqx's data modules, checking on (the jaxtyping hook)": (
        "numpy,PIL.Image,jaxtyping,cait_eqx.data._pipeline,cait_eqx.data._transforms",
        {},
    ),
    "jax": ("jax", {}),
}

_PROBE = """
import importlib, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
rss = [line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]
print(int(rss) // 1024, "jax" in sys.modules)
"""

_WORKERS = """
import multiprocessing, sys
import numpy as np
from PIL import Image
from pathlib import Path
from cait_eqx import data

def main():
    root = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(64):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / c / f"{j:03d}.png")
    source = data.scan_image_folder(root, image_size=16)
    transform = data.TrainTransform((16, 16))
    stream = data.TrainPipeline(source, 16, seed=0, workers=int(sys.argv[2]), transform=transform).batches()
    for _ in range(6):
        next(stream)
    for child in multiprocessing.active_children():
        if child.name.startswith("cait-eqx-data-worker"):
            status = Path(f"/proc/{child.pid}/status").read_text().splitlines()
            rss = [line for line in status if line.startswith("VmRSS")][0].split()[1]
            maps = Path(f"/proc/{child.pid}/maps").read_text()
            print(int(rss) // 1024, "jaxlib" in maps)
    stream.close()

if __name__ == "__main__":
    main()
"""


def _run(code: str, *args: str, env: dict[str, str]) -> list[str]:
    environ = {**os.environ, "PYTHONPATH": SRC, **env}
    done = subprocess.run([sys.executable, "-c", code, *args], env=environ, capture_output=True, text=True,
                          check=True)
    return done.stdout.split("\n")[:-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2, help="data workers of the real pipeline")
    args = parser.parse_args(argv)
    print("| process | resident set MB | JAX imported |")
    print("|---|---|---|")
    for name, (modules, env) in IMPORTS.items():
        (line,) = _run(_PROBE, modules, env=env)
        rss, jax = line.split()
        print(f"| {name} | {rss} | {'yes' if jax == 'True' else 'no'} |")
    with tempfile.TemporaryDirectory() as folder:
        for line in _run(_WORKERS, folder, str(args.workers), env={}):
            rss, jax = line.split()
            print(f"| a data worker of `TrainPipeline` (after 6 batches) | {rss} | "
                  f"{'yes' if jax == 'True' else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
