"""`python -m experiments.cifar_lt`: training from a checkout.

The design's first name for `nc-jax-train` (`nc_jax.cli.train`), kept for
the commands and job scripts that use it: it trains every dataset, not
only CIFAR, with the same flags.
"""

from nc_jax.cli.train import run

if __name__ == "__main__":
  run()
