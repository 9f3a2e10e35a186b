"""Test helper (not a test): run dilemma.py and record every corruption it draws, per process, to
OUT.RANK (a list of (keep_idx, pos_idx)).   python tests/record_corruptions.py OUT ARGS..."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dilemma  # noqa: E402

corrupt_positions, drawn = dilemma.corrupt_positions, []


def recording(*args, **kwargs):
    keep_idx, pos_idx, labels = corrupt_positions(*args, **kwargs)
    drawn.append((keep_idx.cpu(), pos_idx.cpu()))
    return keep_idx, pos_idx, labels


dilemma.corrupt_positions = recording
dilemma.main(sys.argv[2:])
torch.save(drawn, f"{sys.argv[1]}.{os.environ.get('RANK', 0)}")
