"""`python -m experiments.report` from a checkout: `nc-jax-report` (`nc_jax.cli.report`)."""

from nc_jax.cli import nc_jax_report

if __name__ == "__main__":
  nc_jax_report()  # checks the `train` extra, then nc_jax.cli.report.run()
