import hashlib

import torch

from exaggerate.io import save_torch


def test_saved_weights_are_byte_identical_across_runs(tmp_path):
    # Each save goes through a different random temporary file; the bytes must not depend on it,
    # so that DVC sees the same hash for the same weights.
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    digests = set()
    for name in ("a", "b"):
        save_torch(tmp_path / name / "model.pt", state)
        digests.add(hashlib.md5((tmp_path / name / "model.pt").read_bytes()).hexdigest())
    assert len(digests) == 1
    assert torch.equal(torch.load(tmp_path / "a" / "model.pt", weights_only=True)["w"], state["w"])
