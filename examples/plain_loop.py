"""
A training loop with no framework: fit y = 3x + 2 by SGD in pure Python,
logging loss, accuracy and learning rate at every step.

Start a server in this process and print the dashboard URL, or publish to
a running `twistd trainstream`:

    python examples/plain_loop.py
    python examples/plain_loop.py --keep-serving      # the dashboard stays up until Ctrl-C
    python examples/plain_loop.py --url http://127.0.0.1:8890 --run toy --steps 2000
"""

from __future__ import annotations

import argparse
import math
import random

import trainstream
from trainstream.client import Publisher


def train(run: trainstream.Run | Publisher, steps: int, lr0: float = 0.1) -> None:
    rng = random.Random(0)
    data = [(x, 3 * x + 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(256))]
    w = b = 0.0
    run.status("running")
    for step in range(steps):
        lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay
        batch = rng.sample(data, 32)
        errors = [(w * x + b) - y for x, y in batch]
        w -= lr * 2 * sum(e * x for e, (x, _) in zip(errors, batch, strict=True)) / len(batch)
        b -= lr * 2 * sum(errors) / len(batch)
        loss = sum(e * e for e in errors) / len(batch)
        accuracy = sum(abs(e) < 0.25 for e in errors) / len(batch)
        run.log({"train/loss": loss, "train/accuracy": accuracy, "lr": lr}, step=step)
    run.text(f"fitted y = {w:.3f}x + {b:.3f}")
    run.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a trainstream server; default: start one in this process")
    parser.add_argument("--run", default="plain-loop", help="the run's name")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--listen", help="embedded: one endpoint, e.g. tcp:0 (default: 8888-8890)")
    parser.add_argument(
        "--keep-serving", action="store_true", help="embedded: serve the dashboard until Ctrl-C"
    )
    args = parser.parse_args()
    hparams = {"lr": 0.1, "batch": 32, "steps": args.steps}

    if args.url:
        publisher = Publisher(args.url, args.run, hparams=hparams)
        train(publisher, args.steps)
        if not publisher.close(timeout=30):
            raise SystemExit(f"not everything was stored: {publisher.last_error}")
        return
    with trainstream.serve({"listen": args.listen} if args.listen else None) as server:
        print("dashboard:", server.urls["dashboard"], flush=True)
        run = server.run(args.run, hparams=hparams)
        train(run, args.steps)
        run.flush()
        if args.keep_serving:
            trainstream.keep_serving(f"serving {server.urls['dashboard']} until Ctrl-C")
        else:
            print(trainstream.revisit_hint(server.config), flush=True)


if __name__ == "__main__":
    try:
        main()
    except trainstream.TrainstreamError as e:  # a busy port, a history in use: one line
        raise SystemExit(f"plain_loop.py: {e}") from None
