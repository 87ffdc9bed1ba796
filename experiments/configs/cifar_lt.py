"""The bundled training config, by its former path (`--config
experiments/configs/cifar_lt.py:ARGS` in older commands): it now lives in
the package, `nc_jax/configs/cifar_lt.py`, which the command line reads for
this path too."""

from nc_jax.configs.cifar_lt import get_config  # pylint: disable=unused-import
