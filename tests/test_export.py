"""Export: a checkpoint's EMA weights and config as a folder that models.load_pretrained reads in one call."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import train
from models import load_pretrained
from trainer.build import build_diffusion, build_network
from trainer.export import export, main
from trainer.sample import checkpoint_config, load_weights, resolve_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train(tmp_path_factory.mktemp("results"), "--train_num_steps", "3", "--save_and_sample_every", "3",
                 "--ema_update_after_step", "0", "--self_condition")


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_the_exported_folder_loads_back_to_the_same_network(run_dir, tmp_path, weights):
    folder = export(run_dir, out=tmp_path / "export", weights=weights, say=lambda m: None)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(folder)

    run, ckpt = resolve_checkpoint(str(run_dir))
    cfg, _ = checkpoint_config(ckpt, run, has_gpu=False)
    reference = build_network(cfg)
    load_weights(reference, ckpt / f"{weights}.safetensors")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 29])
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t), reference.eval()(x, t))
    # The diffusion comes back with the run's settings: the same samples from the same noise.
    expected = build_diffusion(cfg, reference).eval().sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.sample(2, generator=torch.Generator().manual_seed(0)), expected)
    extra = json.loads((folder / "config.json").read_text())["extra"]
    assert extra["weights"] == weights and extra["step"] == 3 and extra["run_config"]["model"]["self_condition"]


def test_push_to_hub_offline_keeps_the_folder_and_says_how_to_upload(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main([str(run_dir), "--out", str(tmp_path / "e"), "--push_to_hub", "someone/eddy-test"]) == 2
    err = capsys.readouterr().err
    assert "--push_to_hub someone/eddy-test" in err and "huggingface-cli upload someone/eddy-test" in err
    assert (tmp_path / "e" / "model.safetensors").is_file()


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_pretrained(tmp_path)
