"""`python -m bench`: the serving benchmark (same as `yuan-serve bench`)."""

from bench.serving import main

main()
