"""`python -m experiments.cifar_lt`: training from a checkout.

The design's first name for `nc-jax-train` (`nc_jax.cli.train`), kept for
the commands and job scripts that use it: it trains every dataset, not
only CIFAR, with the same flags.
"""

from nc_jax.cli import nc_jax_train

if __name__ == "__main__":
  nc_jax_train()  # checks the `train` extra, then nc_jax.cli.train.run()
