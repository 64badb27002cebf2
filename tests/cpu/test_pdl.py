"""ops/pdl.py: programmatic dependent launch is never used where it cannot work."""

import torch

from distllm.ops import pdl


def test_off_for_cpu_tensors_even_when_enabled(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert not pdl.use_pdl(torch.zeros(2))


def test_on_by_default():
    import os

    assert "DISTLLM_PDL" in os.environ or pdl.ENABLED


def test_launch_options():
    assert pdl.launch_options(False) == {"USE_PDL": False}  # no launch_pdl kwarg for older Tritons
    assert pdl.launch_options(True) == {"USE_PDL": True, "launch_pdl": True}
