"""Train InterLLaVA.

    python -m ivcr_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

A workdir that holds checkpoints is resumed from its latest complete one (same losses as an
uninterrupted run). ``--help --config FILE`` lists every config field.
"""
from __future__ import annotations

import argparse
import sys

from ivcr_jax import cli
from ivcr_jax.experiment import Experiment
from ivcr_jax.train.loop import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ivcr_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, curves")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop after this many steps (default: config.train.steps)")

    def body() -> int:
        config, args = cli.parse(argv, parser)
        summary = train(Experiment.resolve(config), args.workdir, max_steps=args.max_steps)
        print(f"finished at step {summary['final_step']}; logs and checkpoints in {summary['workdir']}")
        return 0
    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
