"""`python -m experiments.evaluate` from a checkout: `nc-jax-evaluate` (`nc_jax.cli.evaluate`)."""

from nc_jax.cli import nc_jax_evaluate

if __name__ == "__main__":
  nc_jax_evaluate()  # checks the `train` extra, then nc_jax.cli.evaluate.run()
