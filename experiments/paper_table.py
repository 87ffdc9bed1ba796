"""`python -m experiments.paper_table` from a checkout: `nc-jax-paper-table` (`nc_jax.cli.paper_table`)."""

from nc_jax.cli import nc_jax_paper_table

if __name__ == "__main__":
  nc_jax_paper_table()  # checks the `train` extra, then nc_jax.cli.paper_table.run()
