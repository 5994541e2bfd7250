"""Train InterLLaVA.

    python -m ivcr_jax.train --config configs/<file>.py[:arg] --workdir DIR [--config.KEY=VALUE ...]

A workdir that holds checkpoints is resumed from its latest complete one (same losses as an
uninterrupted run). ``--help --config FILE`` lists every config field.
"""
from __future__ import annotations

import argparse
import sys

from ivcr_jax import cli, distributed
from ivcr_jax.experiment import USER_ERRORS, Experiment
from ivcr_jax.train.loop import NonFiniteLoss, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ivcr_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, logs, curves")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="stop after this many steps (default: config.train.steps)")

    def body() -> int:
        config, args = cli.parse(argv, parser)
        if args.max_steps is not None and args.max_steps <= 0:
            raise cli.UsageError(f"--max_steps must be a positive number of steps, got {args.max_steps}")
        exp = Experiment.resolve(config)
        # Every config check that needs the devices, before anything is built or compiled.
        distributed.initialize()
        exp.mesh_sizes(training=True)
        summary = train(exp, args.workdir, max_steps=args.max_steps)
        print(f"finished at step {summary['final_step']}; logs and checkpoints in {summary['workdir']}")
        return 0
    return cli.run(body, known=USER_ERRORS + (NonFiniteLoss,))


if __name__ == "__main__":
    sys.exit(main())
