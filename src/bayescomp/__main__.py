"""`python -m bayescomp` behaves as the `bayescomp` command (and works under torchrun)."""

from .cli import main

if __name__ == "__main__":
    main()
