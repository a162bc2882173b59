"""
A small PyTorch MLP classifying two noisy spirals (synthetic, CPU), logged
through trainstream's drop-in for ``torch.utils.tensorboard.SummaryWriter``.

Start a server in this process and print the dashboard URL, or publish to
a running `twistd trainstream`:

    python examples/train_torch.py
    python examples/train_torch.py --keep-serving     # the dashboard stays up until Ctrl-C
    python examples/train_torch.py --url http://127.0.0.1:8890 --run mlp --steps 2000
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import nn

import trainstream
from trainstream.integrations.tensorboard import SummaryWriter  # was: torch.utils.tensorboard


def spirals(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of two interleaved spirals with labels 0 and 1."""
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    angle = t + label * math.pi
    x = torch.stack([t * torch.cos(angle), t * torch.sin(angle)], dim=1) / (3 * math.pi)
    return x + 0.02 * torch.randn(n, 2, generator=generator), label


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )


def train(steps: int, log: Callable[[int, float, float, float], None], lr: float = 0.01) -> None:
    """Train for ``steps`` batches of 128, calling ``log(step, loss, acc, lr)`` after each."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = spirals(4096, generator)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    for step in range(steps):
        index = torch.randint(0, len(x), (128,), generator=generator)
        logits = model(x[index])
        loss = nn.functional.cross_entropy(logits, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        acc = (logits.argmax(1) == y[index]).float().mean()
        log(step, loss.item(), acc.item(), schedule.get_last_lr()[0])
        schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a trainstream server; default: start one in this process")
    parser.add_argument("--run", default="torch-mlp", help="the run's name")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--listen", help="embedded: one endpoint, e.g. tcp:0 (default: 8888-8890)")
    parser.add_argument(
        "--keep-serving", action="store_true", help="embedded: serve the dashboard until Ctrl-C"
    )
    args = parser.parse_args()
    config = {"listen": args.listen} if args.listen and not args.url else None
    # Embedded, hold the server beyond the writer, to keep serving after it closes.
    server = None if args.url else trainstream.get_stream_server(config)

    with SummaryWriter(url=args.url, run=args.run, server_config=config) as writer:
        print("dashboard:", writer.dashboard_url, flush=True)
        writer.add_hparams({"lr": 0.01, "batch": 128, "steps": args.steps}, {})

        def log(step: int, loss: float, acc: float, lr: float) -> None:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/acc", acc, step)
            writer.add_scalar("lr", lr, step)

        train(args.steps, log)
    # leaving the block marked the run finished and flushed it
    if server is not None:
        if args.keep_serving:
            trainstream.keep_serving(f"serving {server.urls['dashboard']} until Ctrl-C")
        else:
            print(trainstream.revisit_hint(server.config), flush=True)
        trainstream.release_stream_server()


if __name__ == "__main__":
    try:
        main()
    except trainstream.TrainstreamError as e:  # a busy port, a history in use: one line
        raise SystemExit(f"train_torch.py: {e}") from None
