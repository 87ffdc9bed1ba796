"""`python -m experiments.cifar_lt`: the first name of `experiments.train`.

Kept because commands and job scripts use it; it trains every dataset, not
only CIFAR, with the same flags as `nc-jax-train` (`experiments.train`).
"""

from experiments.train import run

if __name__ == "__main__":
  run()
