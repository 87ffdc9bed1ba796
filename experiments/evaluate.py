"""`python -m experiments.evaluate` from a checkout: `nc-jax-evaluate` (`nc_jax.cli.evaluate`)."""

from nc_jax.cli.evaluate import run

if __name__ == "__main__":
  run()
