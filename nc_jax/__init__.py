"""nc_jax: fixed simplex-ETF classifiers and the dot-regression loss in JAX.

Reimplements Yang et al., "Inducing Neural Collapse in Imbalanced Learning"
(NeurIPS 2022). The library layers are documented in docs/architecture.md.
"""

__version__ = "0.1.0"
