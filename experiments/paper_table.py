"""`python -m experiments.paper_table` from a checkout: `nc-jax-paper-table` (`nc_jax.cli.paper_table`)."""

from nc_jax.cli.paper_table import run

if __name__ == "__main__":
  run()
