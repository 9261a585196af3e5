"""The fault harness: seeded workloads, faults and a checker that proves the guarantee.

One run starts a secondary and a primary (through a fault proxy), drives a
seeded workload on the mount, injects the faults its seed picks, samples the
replica all along (each sample held at one set with pause/resume) and checks
every sample against the primary's tree at that set's close. ``bin/torture``
runs a campaign of runs; ``tests/test_torture.py`` runs a short one.
"""
