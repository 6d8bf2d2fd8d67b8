"""The tiny random OmniGen2 builder (``fixtures/tiny_model.py``) and the loader's errors on broken folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny_model import build_tiny_omnigen2
from pipelines.family import ModelDirError
from pipelines.omnigen2.loading import load_components
from pipelines.omnigen2.pipeline import OmniGen2Pipeline, ReplayRequest

WEIGHT_FILES = (
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "mllm/model.safetensors",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_omnigen2(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def components(tiny_dir):
    return load_components(tiny_dir, dtype=torch.bfloat16, device="cpu")


@pytest.fixture
def broken_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _request(seed: int) -> ReplayRequest:
    return ReplayRequest(
        prompt="a photo of a cat",
        negative_prompt="",
        seed=seed,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.0,
    )


def test_build_writes_the_real_folder_layout(tiny_dir):
    for rel in (
        *WEIGHT_FILES,
        "transformer/config.json",
        "vae/config.json",
        "mllm/config.json",
        "processor/tokenizer.json",
        "processor/tokenizer_config.json",
        "processor/chat_template.jinja",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ):
        assert (tiny_dir / rel).is_file(), rel
    config = json.loads((tiny_dir / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "OmniGen2Transformer2DModel"
    assert (config["hidden_size"], config["num_layers"], config["num_refiner_layers"]) == (72, 2, 1)
    assert (config["num_attention_heads"], config["num_kv_heads"], config["axes_dim_rope"]) == (
        3,
        1,
        [8, 8, 8],
    )
    assert (config["text_feat_dim"], config["multiple_of"]) == (64, 16)
    assert json.loads((tiny_dir / "mllm" / "config.json").read_text())["text_config"]["hidden_size"] == 64


def test_every_transformer_tensor_is_randomised(tiny_dir):
    state = load_file(tiny_dir / WEIGHT_FILES[0])
    assert [k for k, v in state.items() if not v.any()] == []
    assert [k for k, v in state.items() if v.dim() == 1 and k.endswith("weight") and (v == 1).all()] == []


def test_tokenizer_loads_as_qwen2_with_the_chat_template(components):
    tokenizer = components.tokenizer
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("<|im_start|>user\nhello<|im_end|>").input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "P"}], tokenize=False
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nP<|im_end|>\n"
    assert len(tokenizer) == components.mllm.config.text_config.vocab_size


def test_replay_of_the_tiny_model_is_an_image_that_depends_on_the_seed(components):
    pipeline = OmniGen2Pipeline(components)
    first = pipeline(_request(seed=0))
    again = pipeline(_request(seed=0))
    other = pipeline(_request(seed=1))
    assert first.pixels.shape == (64, 64, 3) and first.pixels.dtype == np.uint8
    assert first.pixels.std() > 10
    assert len(np.unique(first.pixels)) > 50
    assert np.array_equal(first.pixels, again.pixels)
    assert np.abs(first.pixels.astype(int) - other.pixels.astype(int)).mean() > 5


def test_same_seed_builds_identical_tensors_and_another_seed_does_not(tiny_dir, tmp_path):
    same = build_tiny_omnigen2(tmp_path / "same", seed=0)
    other = build_tiny_omnigen2(tmp_path / "other", seed=1)
    for rel in WEIGHT_FILES:
        a, b, c = (load_file(root / rel) for root in (tiny_dir, same, other))
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
        assert not any(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1), rel
    for rel in ("processor/tokenizer.json", "transformer/config.json", "mllm/config.json", "vae/config.json"):
        assert (tiny_dir / rel).read_bytes() == (same / rel).read_bytes(), rel


def test_overrides_change_the_transformer_config(tmp_path):
    root = build_tiny_omnigen2(tmp_path / "m", num_layers=1)
    assert json.loads((root / "transformer" / "config.json").read_text())["num_layers"] == 1
    assert not any(k.startswith("layers.1.") for k in load_file(root / WEIGHT_FILES[0]))
    with pytest.raises(TypeError, match="hiden_size"):
        build_tiny_omnigen2(tmp_path / "bad", hiden_size=64)


def test_missing_subfolder_is_a_load_error_naming_it(broken_copy):
    shutil.rmtree(broken_copy / "vae")
    with pytest.raises(ModelDirError, match="missing subfolder 'vae'") as info:
        load_components(broken_copy)
    assert info.value.path == str(broken_copy / "vae")


def test_transformer_config_of_another_class_is_a_load_error_naming_the_class(broken_copy):
    config_file = broken_copy / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "FluxTransformer2DModel"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="FluxTransformer2DModel") as info:
        load_components(broken_copy)
    assert info.value.path == str(config_file)


def test_shape_mismatch_is_a_load_error_naming_the_key(broken_copy):
    weights = broken_copy / WEIGHT_FILES[0]
    state = load_file(weights)
    state["layers.1.attn.to_k.weight"] = torch.zeros(48, 72)
    save_file(state, weights)
    with pytest.raises(
        ModelDirError, match=r"layers\.1\.attn\.to_k\.weight.*\(48, 72\).*\(24, 72\)"
    ) as info:
        load_components(broken_copy)
    assert info.value.path == str(broken_copy / "transformer")


@pytest.mark.parametrize("rel", WEIGHT_FILES)
def test_pickle_only_weights_folder_is_refused(broken_copy, rel):
    weights = broken_copy / rel
    pickle_file = weights.with_suffix(".bin")
    # Not a loadable pickle: a loader that tried to unpickle it would fail differently.
    pickle_file.write_bytes(b"\x80\x04 not a real pickle")
    weights.unlink()
    with pytest.raises(ModelDirError, match="pickle checkpoint: parity loads safetensors only") as info:
        load_components(broken_copy)
    assert info.value.path == str(pickle_file)


def test_transformer_loaded_on_its_own_thread_is_the_same_and_its_error_comes_first(
    tiny_dir, components, broken_copy, monkeypatch
):
    """The overlap used on a GPU (transformer on a second thread), forced here on the CPU."""
    from pipelines.omnigen2 import loading

    monkeypatch.setattr(loading, "overlap_transformer_load", lambda device: True)
    overlapped = load_components(tiny_dir, dtype=torch.bfloat16, device="cpu")
    for part in ("transformer", "vae", "mllm"):
        ours, theirs = getattr(overlapped, part).state_dict(), getattr(components, part).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert set(overlapped.timings) == {"transformer", "libraries", "vae", "mllm", "tokenizer", "overlapped"}
    assert overlapped.timings["overlapped"] == 1 and components.timings["overlapped"] == 0
    # both the transformer and the VAE broken: the transformer's error, as when loaded one after the other
    (broken_copy / WEIGHT_FILES[0]).unlink()
    (broken_copy / WEIGHT_FILES[1]).write_bytes(b"not safetensors")
    with pytest.raises(ModelDirError, match="no safetensors weights found") as info:
        load_components(broken_copy)
    assert info.value.path.startswith(str(broken_copy / "transformer"))


def test_transformer_weights_survive_a_loader_that_patches_parameter_registration(monkeypatch):
    """On a GPU the transformer loads on its own thread while diffusers builds the VAE under accelerate's
    init_empty_weights, which replaces Module.register_parameter process-wide with one that moves every new
    parameter to the meta device. Our weights are assigned without it: the load must not come out on meta (before,
    it failed with "Cannot copy out of meta tensor", once, on the H200). The patch here does what accelerate's does."""
    from pipelines.omnigen2.loading import load_transformer

    original = torch.nn.Module.register_parameter

    def register_on_meta(self, name, param):
        original(self, name, param)
        if param is not None:
            kind = type(self._parameters[name])
            self._parameters[name] = kind(self._parameters[name].to("meta"), requires_grad=param.requires_grad)

    root = Path(__file__).resolve().parents[1] / "fixtures" / "oracle" / "tiny_omnigen2"
    reference = load_transformer(root, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.nn.Module, "register_parameter", register_on_meta)
    loaded = load_transformer(root, torch.bfloat16, torch.device("cpu"))
    monkeypatch.undo()
    assert not any(p.is_meta for p in loaded.parameters())
    reference_state = reference.state_dict()
    assert all(torch.equal(t, reference_state[k]) for k, t in loaded.state_dict().items())
