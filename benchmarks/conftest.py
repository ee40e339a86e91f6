"""Benchmark configuration: two threads, as on the reference machine."""
import os
import sys

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Benchmarks compare against the transcriptions of published code in tests/published.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
