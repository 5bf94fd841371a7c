"""Reading nmoe-train checkpoints with safetensors + JSON; expert shards merged in rank order."""

from __future__ import annotations

import pytest
import torch

from nmoe_core.model import Transformer
from nmoe_eval.checkpoint import find_step_dir, load_checkpoint


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_load_checkpoint_restores_every_tensor(tmp_path, seed, world_size, make_config,
                                               write_ckpt):
    model = Transformer(make_config(vocab_size=512, tokenizer="custom", eos_token_id=0),
                        seed=seed % 1000)
    step_dir = write_ckpt(tmp_path, model, world_size=world_size, step=12, seq_len=96)
    for path in (tmp_path, tmp_path / "checkpoints", step_dir):
        assert find_step_dir(path) == step_dir
    loaded, info = load_checkpoint(tmp_path)
    assert (info.step, info.seq_len, info.world_size, info.run_id) == (12, 96, world_size,
                                                                       "test-run")
    assert not loaded.training
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key}, seed {seed}"


def test_damaged_or_missing_checkpoints_are_named(tmp_path, make_config, write_ckpt):
    model = Transformer(make_config(vocab_size=512, tokenizer="custom", eos_token_id=0), seed=1)
    step_dir = write_ckpt(tmp_path, model)
    with (step_dir / "shared.safetensors").open("r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="shared.safetensors has 100 bytes"):
        load_checkpoint(step_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
