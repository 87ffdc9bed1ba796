"""The bundled training configs (`cifar_lt.py`: presets and variants)."""

from nc_jax import extras

extras.require(__name__)  # before the imports it checks
