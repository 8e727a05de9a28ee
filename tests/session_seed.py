"""The test run's seed: ``VOS_TEST_SEED``, else a fresh one per process.

A module of its own (not conftest.py, whose name benchmarks/conftest.py shares when one
pytest run collects both folders), so that every test module reads the seed of the run."""
import os
import random

SESSION_SEED = int(os.environ.get("VOS_TEST_SEED", random.randrange(2**31)))
