"""`python -m sftkit` and `accelerate launch -m sftkit train ...`."""

from sftkit.cli import main

main()
