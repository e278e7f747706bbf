import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A noisy random-weight transformers model (transformers' tiny test config) saved with
    save_pretrained: (folder, torch model)."""
    from tests.hf_models import TINY, hf_config, noisy_model, save

    model = noisy_model(hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"]), seed=11)
    return save(model, tmp_path_factory.mktemp("tiny") / "ckpt"), model
