"""`python -m experiments.train` from a checkout: `nc-jax-train` (`nc_jax.cli.train`)."""

from nc_jax.cli import nc_jax_train

if __name__ == "__main__":
  nc_jax_train()  # checks the `train` extra, then nc_jax.cli.train.run()
