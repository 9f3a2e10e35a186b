"""Test helper (not a test): run a training script whose process of rank 1 raises at step 2, as when a
node dies mid-run.   python tests/fail_on_rank1.py dilemma|co_byol ARGS..."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
script = importlib.import_module(sys.argv[1])
schedule = script.schedule


def failing_schedule(step, *rest):
    if int(os.environ.get('RANK', 0)) == 1 and step == 2:
        raise RuntimeError('injected failure on rank 1')
    return schedule(step, *rest)


script.schedule = failing_schedule
script.main(sys.argv[2:])
