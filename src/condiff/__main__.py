"""`python -m condiff` (and `torchrun -m condiff`): the condiff command line."""

from condiff.cli.app import main

main()
