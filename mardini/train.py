"""`python -m mardini.train [overrides]` and `accelerate launch -m mardini.train [overrides]`."""

from .cli import train_main

if __name__ == "__main__":
    train_main()
