"""
The one-line start: fit y = 3x + 2 by SGD in pure Python with
``trainstream.init`` / ``trainstream.log`` / ``trainstream.finish``.

Where it publishes needs no code: ``$TRAINSTREAM_URL`` (and
``$TRAINSTREAM_TOKEN``) if set, else a trainstream server already running on
this machine (127.0.0.1:8890), else one started in this process::

    python examples/quickstart.py
    TRAINSTREAM_URL=http://127.0.0.1:8890 python examples/quickstart.py --steps 2000
    python examples/quickstart.py --system-metrics 1 --fail-at 300   # ends "failed"
"""

from __future__ import annotations

import argparse
import math
import random

import trainstream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the run's name (default: quickstart-DATE-TIME-XXXX)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--system-metrics", type=float, default=0, help="log system/* metrics every N seconds"
    )
    parser.add_argument("--fail-at", type=int, help="raise at this step (the run ends failed)")
    parser.add_argument("--keep-serving", action="store_true", help="embedded: serve until Ctrl-C")
    args = parser.parse_args()

    run = trainstream.init(
        args.run,
        config={"lr": args.lr, "steps": args.steps, "batch": 32},
        system_metrics=args.system_metrics or None,
    )
    print(f"run {run.name}: {run.dashboard_url}", flush=True)

    rng = random.Random(0)
    data = [(x, 3 * x + 2 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(256))]
    w = b = 0.0
    for step in range(args.steps):
        if step == args.fail_at:
            raise RuntimeError(f"stopped at step {step} (--fail-at)")
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        batch = rng.sample(data, 32)
        errors = [(w * x + b) - y for x, y in batch]
        w -= lr * 2 * sum(e * x for e, (x, _) in zip(errors, batch, strict=True)) / len(batch)
        b -= lr * 2 * sum(errors) / len(batch)
        loss = sum(e * e for e in errors) / len(batch)
        trainstream.log({"train/loss": loss, "lr": lr})  # step 0, 1, 2, ...
    run.text(f"fitted y = {w:.3f}x + {b:.3f}")
    if args.keep_serving and run.where in ("started", "embedded"):
        trainstream.keep_serving()
    trainstream.finish()


if __name__ == "__main__":
    try:
        main()
    except trainstream.TrainstreamError as e:  # a busy port, a history in use: one line
        raise SystemExit(f"quickstart.py: {e}") from None
