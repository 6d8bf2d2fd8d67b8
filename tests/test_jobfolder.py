"""The job-folder reader: ai-toolkit's config defaults, preview names and checkpoint metadata."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from parity.errors import InputError
from parity.jobfolder import load_config, read_job_folder, read_safetensors_header

# ---------------------------------------------------------------------------------------------------------
# a small job-folder builder, shared with test_plan.py and test_cli_plan.py


def process_config(sample: dict | None = None, **overrides) -> dict:
    """A minimal omnigen2 LoRA training process; ``overrides`` replace whole keys."""
    process = {
        "type": "sd_trainer",
        "training_folder": "/home/trainer/output",
        "network": {"type": "lora", "linear": 4, "linear_alpha": 4},
        "save": {"dtype": "float16", "save_every": 2, "max_step_saves_to_keep": 10},
        "train": {"steps": 6, "dtype": "bf16"},
        "model": {"name_or_path": "/home/trainer/tiny_omnigen2", "arch": "omnigen2"},
        "sample": {"sample_every": 2, "prompts": ["a cat"], "neg": "", "seed": 42}
        if sample is None
        else sample,
    }
    process.update(overrides)
    return process


def job_config(name: str = "job", sample: dict | None = None, **overrides) -> dict:
    return {
        "job": "extension",
        "config": {"name": name, "process": [process_config(sample, **overrides)]},
        "meta": {"name": name, "version": "1.0"},
    }


def write_safetensors(path: Path, metadata: dict[str, str] | None = None) -> None:
    """A valid one-tensor safetensors file, written by hand (no torch)."""
    header = {"lora_A.weight": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)


def make_job(
    root: Path,
    config: dict | None = None,
    previews: list[tuple[int, int]] = ((0, 0),),
    checkpoints: list[int] = (),
    final_step: int | None = None,
    folder: str = "job",
    config_name: str = "config.yaml",
) -> Path:
    """Write a job folder: ``previews`` are (step, prompt index) in save order, ``checkpoints`` the steps of
    ``<name>_<step:09d>.safetensors``, ``final_step`` the training_info step of ``<name>.safetensors``."""
    config = job_config() if config is None else config
    name = config["config"]["name"]
    job_dir = root / folder
    (job_dir / "samples").mkdir(parents=True)
    if config_name == "config.yaml":
        (job_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    else:
        (job_dir / config_name).write_text(json.dumps(config, indent=2))
    for n, (step, index) in enumerate(previews):
        (job_dir / "samples" / f"{1795681192170 + 500 * n}__{step:09d}_{index}.jpg").write_bytes(b"jpeg")
    for step in checkpoints:
        info = json.dumps({"step": step, "epoch": 0})
        write_safetensors(job_dir / f"{name}_{step:09d}.safetensors", {"training_info": info, "format": "pt"})
    if final_step is not None:
        info = json.dumps({"step": final_step, "epoch": 1})
        write_safetensors(job_dir / f"{name}.safetensors", {"training_info": info, "format": "pt"})
    return job_dir


# ---------------------------------------------------------------------------------------------------------
# config


def test_reads_the_oracle_config(oracle_dir):
    job = read_job_folder(oracle_dir / "jobs" / "og2_basic")
    assert job.name == "og2_basic"
    assert job.config_file.name == "config.yaml"
    assert job.process_type == "sd_trainer"
    assert job.trigger_word == "sks"
    assert job.model.arch == "omnigen2"
    assert job.model.name_or_path == "/home/trainer/aitk/tiny_omnigen2"
    assert job.model.extras_name_or_path == "/home/trainer/aitk/tiny_omnigen2"
    assert (job.model.quantize, job.model.quantize_te, job.model.layer_offloading) == (False, False, False)
    assert job.model.dtype == "bf16"
    assert (job.network.type, job.network.linear, job.network.linear_alpha) == ("lora", 4, 4)
    assert job.network.transformer_only is True
    assert (job.save.dtype, job.save.save_every, job.save.max_step_saves_to_keep) == ("float16", 2, 10)
    assert (job.train.steps, job.train.dtype, job.train.use_ema) == (6, "bf16", False)
    assert job.sample.walk_seed is True
    assert (job.sample.seed, job.sample.guidance_scale, job.sample.sample_steps) == (42, 4, 4)
    assert [s.prompt for s in job.sample.samples][0] == "[trigger] a red circle on a white background"
    assert job.first_sample is None


def test_sample_section_defaults_are_ai_toolkits(tmp_path):
    job = read_job_folder(make_job(tmp_path, job_config(sample={"prompts": ["a"]})))
    s = job.sample
    assert s.sampler == "ddpm"
    assert (s.sample_every, s.sample_start_step, s.width, s.height) == (100, 0, 512, 512)
    assert s.neg is False
    assert (s.seed, s.walk_seed, s.guidance_scale, s.sample_steps) == (0, False, 7, 20)
    assert (s.network_multiplier, s.guidance_rescale, s.format, s.num_frames, s.fps) == (1, 0.0, "jpg", 1, 16)
    item = s.samples[0]
    assert (item.width, item.height, item.neg, item.seed) == (512, 512, False, None)
    assert (item.guidance_scale, item.sample_steps, item.network_multiplier) == (7, 20, 1)
    assert (item.ctrl_img, item.ctrl_img_1, item.ctrl_idx) == (None, None, 0)


def test_model_save_and_train_defaults_are_ai_toolkits(tmp_path):
    config = job_config(
        model={"name_or_path": "org/base", "arch": "omnigen2", "quantize": True},
        save={},
        train={"ema_config": {"use_ema": True}},
        network={"type": "lora"},
    )
    job = read_job_folder(make_job(tmp_path, config))
    assert job.model.quantize_te is True  # defaults to quantize
    assert (job.model.qtype, job.model.qtype_te) == ("qfloat8", "qfloat8")
    assert job.model.extras_name_or_path == "org/base"
    assert (job.save.dtype, job.save.max_step_saves_to_keep, job.save.save_every) == ("float16", 5, 1000)
    assert (job.train.steps, job.train.dtype, job.train.use_ema) == (1000, "fp32", True)
    assert job.model.dtype == "fp32"  # ai-toolkit overwrites model.dtype with train.dtype
    assert (job.network.linear, job.network.linear_alpha) == (4, 1.0)


def test_layer_offloading_defaults_to_auto_memory_and_arch_tag_is_dropped(tmp_path):
    config = job_config(model={"name_or_path": "m", "arch": "omnigen2:blue", "auto_memory": True})
    job = read_job_folder(make_job(tmp_path, config))
    assert job.model.arch == "omnigen2"
    assert job.model.layer_offloading is True
    assert job.model.qtype == "float8"  # ai-toolkit swaps qfloat8 for float8 when offloading


def test_samples_replace_prompts_and_items_fall_back_to_the_section(tmp_path):
    sample = {
        "width": 72,
        "height": 88,
        "neg": "",
        "guidance_scale": 4,
        "prompts": ["ignored"],
        "samples": [{"prompt": "a"}, {"prompt": "b", "width": 128, "neg": "ugly", "seed": 5}],
    }
    job = read_job_folder(make_job(tmp_path, job_config(sample=sample)))
    a, b = job.sample.samples
    assert job.sample.prompts == ["a", "b"]
    assert (a.width, a.height, a.neg, a.seed, a.guidance_scale) == (72, 88, "", None, 4)
    assert (b.width, b.height, b.neg, b.seed) == (128, 88, "ugly", 5)


def test_text_multiplier_becomes_a_float_or_one(tmp_path):
    sample = {
        "samples": [{"prompt": "a", "network_multiplier": "0.5"}, {"prompt": "b", "network_multiplier": "x"}]
    }
    job = read_job_folder(make_job(tmp_path, job_config(sample=sample)))
    assert [s.network_multiplier for s in job.sample.samples] == [0.5, 1.0]


def test_ui_job_config_json_is_read_with_name_tag_replaced(tmp_path):
    config = job_config(name="ui_job", sample={"samples": [{"prompt": "[name] photo", "ctrl_img": None}]})
    config["config"]["process"][0]["type"] = "diffusion_trainer"
    config["config"]["process"][0]["trigger_word"] = None
    config["meta"]["name"] = "[name]"
    job = read_job_folder(make_job(tmp_path, config, config_name=".job_config.json"))
    assert job.config_file.name == ".job_config.json"
    assert job.process_type == "diffusion_trainer"
    assert job.sample.samples[0].prompt == "ui_job photo"  # ai-toolkit replaces [name] at load


def test_ui_job_config_stored_as_a_json_string_is_read(tmp_path):
    job_dir = make_job(tmp_path, job_config(name="nested"), config_name=".job_config.json")
    (job_dir / ".job_config.json").write_text(
        json.dumps({"job_config": json.dumps(job_config(name="nested"))})
    )
    assert read_job_folder(job_dir).name == "nested"


def test_config_yaml_is_preferred_over_job_config_json(tmp_path):
    job_dir = make_job(tmp_path, job_config(name="from_yaml"))
    (job_dir / ".job_config.json").write_text(json.dumps(job_config(name="from_json")))
    config_file, raw = load_config(job_dir)
    assert config_file.name == "config.yaml"
    assert raw["config"]["name"] == "from_yaml"


@pytest.mark.parametrize(
    "config, problem",
    [
        (
            job_config(model={"arch": "sdxl", "name_or_path": "m"}),
            "model.arch is 'sdxl'; parity supports: omnigen2, flux",
        ),
        (job_config(model={"name_or_path": "m"}), "model.arch is not set"),
        (job_config(type="extract"), "no LoRA training process"),
        (job_config(network=None), "no network section"),
        (job_config(sample={"width": "wide", "prompts": ["a"]}), "sample.width must be an integer"),
        (job_config(sample={"samples": [{"prompt": 3}]}), "samples[0].prompt must be text"),
        (job_config(trigger_word=7), "trigger_word must be text"),
    ],
)
def test_unusable_configs_are_input_errors(tmp_path, config, problem):
    job_dir = make_job(tmp_path, config)
    with pytest.raises(InputError) as err:
        read_job_folder(job_dir)
    assert err.value.path == str(job_dir / "config.yaml")
    assert problem in err.value.problem


# ---------------------------------------------------------------------------------------------------------
# previews


def test_previews_are_parsed_from_file_names(tmp_path):
    job = read_job_folder(make_job(tmp_path, previews=[(0, 0), (0, 1), (250, 10)]))
    assert [(p.step, p.prompt_index, p.ext) for p in job.previews] == [
        (0, 0, "jpg"),
        (0, 1, "jpg"),
        (250, 10, "jpg"),
    ]
    assert job.previews[0].ms_time == 1795681192170
    assert job.previews[0].file == "1795681192170__000000000_0.jpg"


def test_tmp_thumbs_and_hidden_files_are_ignored(tmp_path):
    job_dir = make_job(tmp_path)
    for hidden in (".tmp", ".thumbs"):
        (job_dir / "samples" / hidden).mkdir()
        (job_dir / "samples" / hidden / "1795681192170__000000000_0.jpg.jpg").write_bytes(b"x")
    (job_dir / "samples" / ".DS_Store").write_bytes(b"x")
    job = read_job_folder(job_dir)
    assert len(job.previews) == 1
    assert job.warnings == ()


def test_non_preview_image_in_samples_is_an_input_error(tmp_path):
    job_dir = make_job(tmp_path)
    (job_dir / "samples" / "my_favourite.png").write_bytes(b"x")
    with pytest.raises(InputError) as err:
        read_job_folder(job_dir)
    assert err.value.path == str(job_dir / "samples" / "my_favourite.png")
    assert "not a preview" in err.value.problem


def test_non_image_file_in_samples_is_a_warning(tmp_path):
    job_dir = make_job(tmp_path)
    (job_dir / "samples" / "notes.txt").write_text("x")
    assert read_job_folder(job_dir).warnings == ("ignored samples/notes.txt: not a preview",)


def test_no_previews_is_an_input_error(tmp_path):
    job_dir = make_job(tmp_path, previews=[])
    with pytest.raises(InputError, match="no previews"):
        read_job_folder(job_dir)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def test_oracle_checkpoints_and_their_training_info(oracle_dir):
    job = read_job_folder(oracle_dir / "jobs" / "og2_basic")
    assert [(c.file, c.step, c.is_final, c.training_step) for c in job.checkpoints] == [
        ("og2_basic_000000002.safetensors", 2, False, 2),
        ("og2_basic_000000004.safetensors", 4, False, 4),
        ("og2_basic.safetensors", None, True, 6),
    ]
    final = job.final_checkpoint
    assert final.dtypes == ("F16",)
    assert final.metadata["ss_base_model_version"] == "omnigen2"
    assert job.checkpoint_for_step(4).epoch == 0


def test_other_safetensors_files_are_not_checkpoints(tmp_path):
    job_dir = make_job(tmp_path, checkpoints=[2], final_step=6)
    write_safetensors(job_dir / "other_000000002.safetensors")
    write_safetensors(job_dir / "job_2.safetensors")
    assert [c.file for c in read_job_folder(job_dir).checkpoints] == [
        "job_000000002.safetensors",
        "job.safetensors",
    ]


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x01\x02", "shorter than its 8-byte header length"),
        (struct.pack("<Q", 10**6) + b"{}", "beyond the file"),
        (struct.pack("<Q", 4) + b"nope", "header is not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_broken_safetensors_header_is_an_input_error(tmp_path, content, problem):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_safetensors_header(path)
    assert err.value.path == str(path)
    assert problem in err.value.problem
