"""Unmodified PyTorch inside a Tessera slice: prints one line of key=value results.

    python3 torch_slices.py meminfo
    python3 torch_slices.py oom
    python3 torch_slices.py train --seconds S [--graph]

Run with the slice library preloaded (bench/gpu/run.sh does it); nothing here knows about it.
"""
import sys
import time

import torch


def meminfo():
    free, total = torch.cuda.mem_get_info()
    print(f"free_bytes={free} total_bytes={total}")


def oom():
    blocks, step = [], 256 << 20
    try:
        while True:
            blocks.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        print(f"allocated_bytes={len(blocks) * step} error=OutOfMemoryError")
        return
    print("error=none")


def train(seconds, graph):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096)
    ).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2048, 4096, device="cuda")
    y = torch.randn(2048, 4096, device="cuda")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()

    if graph:
        # Warm up on a side stream, then capture one whole training step.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    else:
        for _ in range(3):
            step()
        run = step
    torch.cuda.synchronize()
    start, n = time.time(), 0
    while time.time() - start < seconds:
        run()
        n += 1
        if n % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    elapsed = time.time() - start
    print(f"steps_per_s={n / elapsed:.2f} steps={n} seconds={elapsed:.2f}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "meminfo":
        meminfo()
    elif mode == "oom":
        oom()
    elif mode == "train":
        secs = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 20.0
        train(secs, "--graph" in sys.argv)
    else:
        sys.exit(__doc__)
