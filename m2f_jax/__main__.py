"""`python -m m2f_jax` / `m2f-jax`: the command line (m2f_jax.cli)."""
import sys

from m2f_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
