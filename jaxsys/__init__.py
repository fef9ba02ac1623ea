"""jaxsys: functional training and parallelism in JAX.

Importing the package does not import JAX, so the CLI can configure XLA first.
"""

__version__ = "0.1.0"
