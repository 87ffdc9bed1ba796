"""`python -m experiments.train` from a checkout: `nc-jax-train` (`nc_jax.cli.train`)."""

from nc_jax.cli.train import run

if __name__ == "__main__":
  run()
