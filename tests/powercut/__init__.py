# A power-cut simulator for tests: a FUSE passthrough that keeps file data until it
# is fsynced, and drops it (all, or a seeded part) when the power is cut. The process
# is ``python -m tests.powercut`` (fs.py, pending.py); tests drive it with harness.py.
