"""controlnet.runtime: the device, dtype and allocator choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from controlnet import runtime

# In a fresh process (the setting is process-wide): the minor page faults of the last five of
# twenty 64 MiB allocations, before and after keep_freed_memory(). Kept, the heap grows for the first
# few (torch's 64-byte aligned blocks do not fit exactly in the ones freed) and then serves them all.
_FAULTS_SCRIPT = """
import resource
import torch
from controlnet.runtime import keep_freed_memory

def step():  # a 64 MiB activation, above glibc's largest mmap threshold: allocated, written, freed
    torch.empty(16 * 2**20).fill_(1.0)

def faults():
    for _ in range(15):
        step()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

before = faults()
kept = keep_freed_memory()
print(before, int(kept), faults())
"""


def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    before, kept, after = (int(word) for word in result.stdout.split())
    if not kept:
        pytest.skip("not glibc: keep_freed_memory changes nothing here")
    pages = 5 * 64 * 2**20 // 4096
    assert before > pages // 2  # glibc's default: each block mapped afresh and faulted in again
    assert after < pages // 20  # kept: the freed blocks are reused


def test_parse_dtype_names_and_refusals():
    assert runtime.parse_dtype("bfloat16", "cpu") == torch.bfloat16
    assert runtime.parse_dtype(torch.float16, "cpu") == torch.float16
    assert runtime.parse_dtype("auto", "cpu") == runtime.default_dtype("cpu")
    with pytest.raises(ValueError, match="unknown dtype 'half'; choose auto, float32, bfloat16, float16"):
        runtime.parse_dtype("half", "cpu")
