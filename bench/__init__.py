"""thinblock's benchmark: side by side with qemu-nbd and nbdkit, and metadata scale (issue 5).

Run ``python -m bench.run`` (or ``make bench``) from the repository root; see bench/README.md.
"""
