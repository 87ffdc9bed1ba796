"""`python -m experiments.report` from a checkout: `nc-jax-report` (`nc_jax.cli.report`)."""

from nc_jax.cli.report import run

if __name__ == "__main__":
  run()
