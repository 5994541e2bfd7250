"""``python -m ivcr_jax.train --config configs/<file>.py[:arg] [--config.key=value ...] --workdir DIR``"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, curves.")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "Stop after this many steps (default: config).")


def main(argv):
    del argv
    from ivcr_jax.train.loop import train

    summary = train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value)
    print(f"finished at step {summary['final_step']}; logs and checkpoints in {summary['workdir']}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
