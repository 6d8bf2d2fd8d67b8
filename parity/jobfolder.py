"""Read an ai-toolkit job folder: its config, its previews and its checkpoints (no torch).

The folder layout and every default below are ai-toolkit's (FACTS §1-§2): ``config.yaml`` (or the web UI's
``.job_config.json``), ``samples/<ms>__<step:09d>_<i>.<ext>``, ``<name>_<step:09d>.safetensors`` and the final
``<name>.safetensors``. Nothing here writes to the folder or loads a tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from parity.errors import InputError
from parity.safe_io import MAX_IMAGE_SIDE, file_kind, load_yaml, open_regular, parse_json, read_text

TRAINER_TYPES = ("sd_trainer", "ui_trainer", "diffusion_trainer")
# ai-toolkit's legacy model flags, read when model.arch is absent (toolkit/config_modules.py ModelConfig), in its order
LEGACY_ARCH_FLAGS = (("is_v2", "sd2"), ("is_v3", "sd3"), ("is_xl", "sdxl"), ("is_pixart", "pixart"),
                     ("is_pixart_sigma", "pixart_sigma"), ("is_auraflow", "auraflow"), ("is_flux", "flux"),
                     ("is_lumina2", "lumina2"), ("is_vega", "vega"), ("is_ssd", "ssd"))
ARCH_ALIASES = {"flex1": "flux"}  # ModelConfig renames it before anything reads arch

PREVIEW_PATTERN = "<ms>__<step:09d>_<i>.<ext>"
_PREVIEW_RE = re.compile(r"(?P<ms>\d+)__(?P<step>\d{9,})_(?P<index>\d+)\.(?P<ext>[A-Za-z0-9]+)")
# A file in samples/ with one of these extensions that is not named like a preview is bad input.
_MEDIA_EXTS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "mp4", "wav", "mp3", "flac", "ogg"}
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ModelSettings:
    """``model:`` as ai-toolkit's ModelConfig reads it."""

    arch: str
    name_or_path: str | None
    extras_name_or_path: str | None  # defaults to name_or_path: MLLM, VAE and processor come from here
    quantize: bool
    quantize_te: bool  # defaults to quantize
    qtype: str
    qtype_te: str
    dtype: str  # ai-toolkit overwrites model.dtype with train.dtype before loading
    layer_offloading: bool  # defaults to the deprecated auto_memory
    accuracy_recovery_adapter: str | None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # sampling flags of the model: section that a family's preview depends on (use_flux_cfg, attn_masking)
    flags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkSettings:
    """``network:`` as ai-toolkit's NetworkConfig reads it."""

    type: str
    linear: int
    linear_alpha: float
    transformer_only: bool
    network_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SaveSettings:
    dtype: str
    save_every: int
    max_step_saves_to_keep: int  # 0 keeps every checkpoint


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    dtype: str
    use_ema: bool
    skip_first_sample: bool
    force_first_sample: bool
    disable_sampling: bool


@dataclass(frozen=True)
class SampleItem:
    """One entry of ``sample.samples`` (or of ``sample.prompts``), section values filled in."""

    prompt: str | None
    width: int
    height: int
    neg: Any  # usually text; ai-toolkit's default is the boolean False
    seed: int | None  # None: no own seed, the round's seed applies
    guidance_scale: float
    sample_steps: int
    network_multiplier: float
    ctrl_img: str | None
    ctrl_img_1: str | None
    ctrl_idx: int
    num_frames: int
    fps: int


@dataclass(frozen=True)
class SampleSection:
    """``sample:`` (or ``first_sample:``) with every default of ai-toolkit's SampleConfig."""

    sampler: str
    sample_every: int
    sample_start_step: int
    width: int
    height: int
    neg: Any
    seed: int
    walk_seed: bool
    guidance_scale: float
    sample_steps: int
    network_multiplier: float
    guidance_rescale: float
    format: str
    num_frames: int
    fps: int
    samples: tuple[SampleItem, ...]

    @property
    def prompts(self) -> list[str]:
        """The prompts ai-toolkit loops over: items without a prompt are skipped here but NOT in ``samples``,
        so prompt ``i`` takes its settings from ``samples[i]`` (an ai-toolkit quirk kept on purpose)."""
        return [s.prompt for s in self.samples if s.prompt is not None]


@dataclass(frozen=True)
class Preview:
    """One preview image in ``samples/``."""

    file: str
    path: Path
    ms_time: int
    step: int
    prompt_index: int
    ext: str


@dataclass(frozen=True)
class Checkpoint:
    """A LoRA file ai-toolkit saved: ``<name>_<step:09d>.safetensors`` or the final ``<name>.safetensors``."""

    file: str
    path: Path
    step: int | None  # from the file name; None for the final file
    is_final: bool
    training_step: int | None  # training_info.step from the metadata
    epoch: int | None
    tensor_count: int
    dtypes: tuple[str, ...]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFolder:
    """Everything parity reads from one job folder."""

    path: Path
    config_file: Path
    name: str  # job config.name: the checkpoint files use it
    process_type: str
    trigger_word: str | None
    model: ModelSettings
    network: NetworkSettings
    save: SaveSettings
    train: TrainSettings
    sample: SampleSection
    first_sample: SampleSection | None
    previews: tuple[Preview, ...]
    checkpoints: tuple[Checkpoint, ...]
    warnings: tuple[str, ...] = ()
    training_seed: int | None = None  # seeds Python's random (and torch) when training starts; None: not set

    def checkpoint_for_step(self, step: int) -> Checkpoint | None:
        """The intermediate checkpoint saved at ``step``, if it is still there."""
        return next((c for c in self.checkpoints if c.step == step), None)

    @property
    def final_checkpoint(self) -> Checkpoint | None:
        return next((c for c in self.checkpoints if c.is_final), None)


def read_job_folder(path: str | Path) -> JobFolder:
    """Read a job folder written by ai-toolkit; raise InputError naming the file for anything unusable."""
    job_dir = Path(path)
    if not job_dir.exists():
        raise InputError(job_dir, "no such job folder")
    if not job_dir.is_dir():
        raise InputError(job_dir, "is a file, not a job folder")
    config_file, raw = load_config(job_dir)
    warnings: list[str] = []
    if (disagreement := config_disagreement(job_dir, config_file, raw)) is not None:
        warnings.append(disagreement)
    cfg = _Reader(config_file)

    job_config = cfg.mapping(raw.get("config"), "config")
    name = job_config.get("name")
    if not isinstance(name, str) or not name:
        raise InputError(config_file, "config.name is missing: ai-toolkit needs it to name checkpoints")
    process, where = _training_process(cfg, job_config)
    train = _train_settings(cfg, process, where)
    model = _model_settings(cfg, process, where, train.dtype)
    trigger_word = process.get("trigger_word")
    if trigger_word is not None and not isinstance(trigger_word, str):
        raise InputError(config_file, f"{where}.trigger_word must be text, got {trigger_word!r}")
    first_raw = process.get("first_sample")
    previews, preview_warnings = list_previews(job_dir)
    warnings += preview_warnings
    training_seed = _training_seed(process, job_config, where, warnings)
    return JobFolder(
        path=job_dir,
        config_file=config_file,
        name=name,
        process_type=process["type"],
        trigger_word=trigger_word,
        model=model,
        network=_network_settings(cfg, process, where),
        save=_save_settings(cfg, process, where),
        train=train,
        sample=_sample_section(cfg, process.get("sample", {}), f"{where}.sample"),
        first_sample=None if first_raw is None else _sample_section(cfg, first_raw, f"{where}.first_sample"),
        previews=tuple(previews),
        checkpoints=tuple(list_checkpoints(job_dir, name)),
        warnings=tuple(warnings),
        training_seed=training_seed,
    )


# ---------------------------------------------------------------------------------------------------------
# config


def load_config(job_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The job dict ``{job, config, meta}``: ``config.yaml`` if present, else the web UI's ``.job_config.json``."""
    yaml_file = job_dir / "config.yaml"
    json_file = job_dir / ".job_config.json"
    if os.path.lexists(yaml_file):
        raw, config_file = _load_yaml_config(yaml_file), yaml_file
    elif os.path.lexists(json_file):
        raw, config_file = _load_json_config(json_file), json_file
    else:
        raise InputError(job_dir, "no config.yaml or .job_config.json: not an ai-toolkit job folder")
    if not isinstance(raw, dict):
        raise InputError(config_file, "expected a mapping with job, config and meta at the top")
    if "config" not in raw:
        raise InputError(config_file, "no 'config' section: not an ai-toolkit job config")
    return config_file, raw


def _load_yaml_config(yaml_file: Path) -> Any:
    try:
        return load_yaml(read_text(yaml_file, "config"), yaml_file)
    except yaml.YAMLError as exc:
        raise InputError(yaml_file, f"not valid YAML: {_yaml_problem(exc)}") from None


def _load_json_config(json_file: Path) -> Any:
    raw = parse_json(read_text(json_file, "config"), json_file)
    # The UI stores the job config as a JSON string in its database; accept it still encoded.
    if isinstance(raw, dict) and isinstance(raw.get("job_config"), str):
        raw = parse_json(raw["job_config"], json_file)
    if isinstance(raw, str):
        raw = parse_json(raw, json_file)
    return _replace_name_tag(raw) if isinstance(raw, dict) else raw


def config_disagreement(job_dir: Path, config_file: Path, raw: dict[str, Any]) -> str | None:
    """A warning when the job folder holds both config files and their ``config`` sections differ: parity
    reads ``config.yaml``, but the UI edits ``.job_config.json``, so one of them is stale."""
    other = job_dir / ".job_config.json"
    if config_file.name != "config.yaml" or not os.path.lexists(other):
        return None
    try:
        theirs = _load_json_config(other)
    except InputError as exc:
        return f"{other.name} cannot be compared with config.yaml ({exc.problem}); using config.yaml"
    if not isinstance(theirs, dict):
        return f"{other.name} holds no job config to compare with config.yaml; using config.yaml"
    where = _first_difference(raw.get("config"), theirs.get("config"), "config")
    if where is None:
        return None
    return (f"config.yaml and {other.name} disagree (first at {where}); using config.yaml: remove the stale one "
            "if the previews were made with the other")


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    """The first path at which two parsed configs differ, or None (1 and 1.0 are equal, as in ai-toolkit)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{where}.{key}"
            if (found := _first_difference(a[key], b[key], f"{where}.{key}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if (found := _first_difference(x, y, f"{where}[{i}]")) is not None:
                return found
        return None
    return None if a == b and type(a) is type(b) or _same_number(a, b) else where


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


def _replace_name_tag(raw: dict[str, Any]) -> dict[str, Any]:
    # ai-toolkit replaces [name] in the whole job at load time; config.yaml shows the result, the UI's JSON does not.
    name = raw.get("config", {}).get("name") if isinstance(raw.get("config"), dict) else None
    if not isinstance(name, str):
        return raw
    return json.loads(json.dumps(raw).replace("[name]", name))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


class _Reader:
    """Typed reads of config values; every failure is an InputError naming the config file and the key."""

    def __init__(self, config_file: Path):
        self.file = config_file

    def fail(self, problem: str) -> InputError:
        return InputError(self.file, problem)

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be a mapping, got {_kind(value)}")
        return value

    def integer(self, value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{where} must be an integer, got {value!r}")
        if low is not None and value < low:
            raise self.fail(f"{where} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise self.fail(f"{where} must be at most {high}, got {value}")
        return value

    def number(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(f"{where} must be a finite number, got {value!r}")
        return value

    def size(self, value: Any, where: str) -> int:
        """A width or height: ai-toolkit floors it to 8 with a minimum of 64 (so 0 or less still renders), and
        parity holds each side to MAX_IMAGE_SIDE, the size its image cap allows (safe_io)."""
        return self.integer(value, where, high=MAX_IMAGE_SIDE)

    def text(self, value: Any, where: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"{where} must be text, got {value!r}")
        return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _training_process(cfg: _Reader, job_config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    processes = job_config.get("process")
    if not isinstance(processes, list) or not processes:
        raise cfg.fail("config.process must be a non-empty list of processes")
    types = []
    for i, process in enumerate(processes):
        if isinstance(process, dict):
            types.append(process.get("type"))
            if process.get("type") in TRAINER_TYPES:
                return process, f"config.process[{i}]"
    raise cfg.fail(
        f"no LoRA training process (process types {types}; expected one of {', '.join(TRAINER_TYPES)})"
    )


def _training_seed(process: dict[str, Any], job_config: dict[str, Any], where: str,
                   warnings: list[str]) -> int | None:
    """The process's ``training_seed``: BaseTrainProcess calls ``random.seed`` with it when the process is built, so
    the seeds drawn for ``seed: -1`` previews come from that stream. Its fallback, an attribute of the job object,
    is set by no ai-toolkit job class: a job-level ``config.training_seed`` seeds nothing."""
    value = process.get("training_seed")
    if value is None and job_config.get("training_seed") is not None:
        warnings.append(f"config.training_seed is ignored by ai-toolkit (only {where}.training_seed seeds "
                        "Python's random): drawn seeds are not recoverable from it")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        warnings.append(f"{where}.training_seed {value!r} is not an integer: parity does not recover drawn seeds "
                        "from it")
        return None
    return value


def _model_settings(cfg: _Reader, process: dict[str, Any], where: str, train_dtype: str) -> ModelSettings:
    model = cfg.mapping(process.get("model", {}), f"{where}.model")
    arch = model_arch(cfg, model, where)
    name_or_path = cfg.text(model.get("name_or_path"), f"{where}.model.name_or_path", optional=True)
    quantize = bool(model.get("quantize", False))
    qtype = cfg.text(model.get("qtype", "qfloat8"), f"{where}.model.qtype")
    qtype_te = cfg.text(model.get("qtype_te", "qfloat8"), f"{where}.model.qtype_te")
    layer_offloading = bool(model.get("layer_offloading", model.get("auto_memory", False)))
    if layer_offloading:
        # ai-toolkit swaps quanto's qfloat8 for plain float8 when offloading layers
        qtype = "float8" if qtype == "qfloat8" else qtype
        qtype_te = "float8" if qtype_te == "qfloat8" else qtype_te
    ara = model.get("accuracy_recovery_adapter")
    if "|" in qtype:
        qtype, ara = qtype.split("|", 1)
    model_kwargs = model.get("model_kwargs") or {}
    return ModelSettings(
        arch=arch,
        name_or_path=name_or_path,
        extras_name_or_path=cfg.text(
            model.get("extras_name_or_path", name_or_path),
            f"{where}.model.extras_name_or_path",
            optional=True,
        ),
        quantize=quantize,
        quantize_te=bool(model.get("quantize_te", quantize)),
        qtype=qtype,
        qtype_te=qtype_te,
        dtype=train_dtype,
        layer_offloading=layer_offloading,
        accuracy_recovery_adapter=ara,
        model_kwargs=cfg.mapping(model_kwargs, f"{where}.model.model_kwargs"),
        flags=_model_flags(cfg, model, where, arch),
    )


def model_arch(cfg: _Reader, model: dict[str, Any], where: str) -> str:
    """``model.arch`` as ai-toolkit resolves it: a UI ``:tag`` dropped, aliases renamed, the legacy ``is_*`` flags
    when absent (sd1 when none is set); an arch no family of this install serves is an InputError."""
    from pipelines.registry import supported_archs

    arch = model.get("arch")
    if arch is None:
        arch = next((name for flag, name in LEGACY_ARCH_FLAGS if model.get(flag)), None)
    supported = ", ".join(supported_archs())
    if arch is None:
        raise cfg.fail(f"{where}.model.arch is not set (ai-toolkit then trains sd1); parity supports: {supported}")
    arch = str(arch).split(":")[0]  # the UI may append ":<tag>"; ai-toolkit drops it
    arch = ARCH_ALIASES.get(arch, arch)
    if arch not in supported_archs():
        raise cfg.fail(f"model.arch is {arch!r}; parity supports: {supported}")
    return arch


def _model_flags(cfg: _Reader, model: dict[str, Any], where: str, arch: str) -> dict[str, Any]:
    """The model: flags that change how a preview is sampled. ``attn_masking`` is validated against the legacy
    ``is_flux`` key before arch is read (ModelConfig): without it ai-toolkit refuses the config."""
    is_flux = bool(model.get("is_flux", False)) or arch == "flux"
    attn_masking = bool(model.get("attn_masking", False))
    if attn_masking and not model.get("is_flux", False):
        raise cfg.fail(f"{where}.model.attn_masking needs is_flux: true: ai-toolkit raises 'attn_masking is only "
                       "supported with flux models currently' otherwise, so this config made no previews")
    return {"use_flux_cfg": bool(model.get("use_flux_cfg", False)), "attn_masking": attn_masking and is_flux}


def _network_settings(cfg: _Reader, process: dict[str, Any], where: str) -> NetworkSettings:
    network = process.get("network")
    if network is None:
        raise cfg.fail(f"{where} has no network section: parity replays LoRA jobs only")
    network = cfg.mapping(network, f"{where}.network")
    rank = network.get("rank", network.get("linear"))
    rank = 4 if rank is None else cfg.integer(rank, f"{where}.network.linear")
    alpha = network.get("linear_alpha", network.get("alpha", 1.0))
    return NetworkSettings(
        type=str(network.get("type", "lora")),
        linear=rank,
        linear_alpha=cfg.number(alpha, f"{where}.network.linear_alpha"),
        transformer_only=bool(network.get("transformer_only", True)),
        network_kwargs=cfg.mapping(network.get("network_kwargs") or {}, f"{where}.network.network_kwargs"),
    )


def _save_settings(cfg: _Reader, process: dict[str, Any], where: str) -> SaveSettings:
    save = cfg.mapping(process.get("save", {}), f"{where}.save")
    return SaveSettings(
        dtype=str(save.get("dtype", "float16")),
        save_every=cfg.integer(save.get("save_every", 1000), f"{where}.save.save_every"),
        max_step_saves_to_keep=cfg.integer(
            save.get("max_step_saves_to_keep", 5), f"{where}.save.max_step_saves_to_keep"
        ),
    )


def _train_settings(cfg: _Reader, process: dict[str, Any], where: str) -> TrainSettings:
    train = cfg.mapping(process.get("train", {}), f"{where}.train")
    ema = train.get("ema_config")
    return TrainSettings(
        steps=cfg.integer(train.get("steps", 1000), f"{where}.train.steps", low=1),
        dtype=str(train.get("dtype", "fp32")),
        use_ema=bool(isinstance(ema, dict) and ema.get("use_ema", False)),
        skip_first_sample=bool(train.get("skip_first_sample", False)),
        force_first_sample=bool(train.get("force_first_sample", False)),
        disable_sampling=bool(train.get("disable_sampling", False)),
    )


def _sample_section(cfg: _Reader, raw: Any, where: str) -> SampleSection:
    section = cfg.mapping(raw, where)
    ext = str(section.get("format", "jpg"))
    num_frames = cfg.integer(section.get("num_frames", 1), f"{where}.num_frames", low=1)
    if num_frames > 1 and ext != "webp":
        ext = "webp"  # ai-toolkit saves multi-frame samples as animated webp whatever the format says
    values = dict(
        sampler=str(section.get("sampler", "ddpm")),
        sample_every=cfg.integer(section.get("sample_every", 100), f"{where}.sample_every"),
        sample_start_step=cfg.integer(section.get("sample_start_step", 0), f"{where}.sample_start_step"),
        width=cfg.size(section.get("width", 512), f"{where}.width"),
        height=cfg.size(section.get("height", 512), f"{where}.height"),
        neg=section.get("neg", False),
        seed=cfg.integer(section.get("seed", 0), f"{where}.seed"),
        walk_seed=bool(section.get("walk_seed", False)),
        guidance_scale=cfg.number(section.get("guidance_scale", 7), f"{where}.guidance_scale"),
        sample_steps=cfg.integer(section.get("sample_steps", 20), f"{where}.sample_steps", low=1),
        network_multiplier=_multiplier(
            cfg, section.get("network_multiplier", 1), f"{where}.network_multiplier"
        ),
        guidance_rescale=cfg.number(section.get("guidance_rescale", 0.0), f"{where}.guidance_rescale"),
        format=ext,
        num_frames=num_frames,
        fps=cfg.integer(section.get("fps", 16), f"{where}.fps"),
    )
    # `samples:` replaces `prompts:` when both are given
    if "samples" in section:
        raw_items = section["samples"]
        items_where = f"{where}.samples"
    else:
        prompts = section.get("prompts", [])
        if not isinstance(prompts, list):
            raise cfg.fail(f"{where}.prompts must be a list, got {_kind(prompts)}")
        raw_items = [{"prompt": p} for p in prompts]
        items_where = f"{where}.prompts"
    if not isinstance(raw_items, list):
        raise cfg.fail(f"{items_where} must be a list, got {_kind(raw_items)}")
    items = tuple(_sample_item(cfg, item, values, f"{items_where}[{i}]") for i, item in enumerate(raw_items))
    return SampleSection(**values, samples=items)


def _sample_item(cfg: _Reader, raw: Any, section: dict[str, Any], where: str) -> SampleItem:
    item = cfg.mapping(raw, where)
    prompt = item.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise cfg.fail(f"{where}.prompt must be text, got {prompt!r}")
    seed = item.get("seed")
    ctrl_img = cfg.text(item.get("ctrl_img"), f"{where}.ctrl_img", optional=True)
    return SampleItem(
        prompt=prompt,
        width=cfg.size(item.get("width", section["width"]), f"{where}.width"),
        height=cfg.size(item.get("height", section["height"]), f"{where}.height"),
        neg=item.get("neg", section["neg"]),
        seed=None if seed is None else cfg.integer(seed, f"{where}.seed"),
        guidance_scale=cfg.number(
            item.get("guidance_scale", section["guidance_scale"]), f"{where}.guidance_scale"
        ),
        sample_steps=cfg.integer(item.get("sample_steps", section["sample_steps"]), f"{where}.sample_steps", low=1),
        network_multiplier=_multiplier(
            cfg, item.get("network_multiplier", section["network_multiplier"]), f"{where}.network_multiplier"
        ),
        ctrl_img=ctrl_img,
        ctrl_img_1=cfg.text(item.get("ctrl_img_1", ctrl_img), f"{where}.ctrl_img_1", optional=True),
        ctrl_idx=cfg.integer(item.get("ctrl_idx", 0), f"{where}.ctrl_idx"),
        num_frames=cfg.integer(item.get("num_frames", section["num_frames"]), f"{where}.num_frames", low=1),
        fps=cfg.integer(item.get("fps", section["fps"]), f"{where}.fps"),
    )


def _multiplier(cfg: _Reader, value: Any, where: str) -> float:
    # ai-toolkit turns a text multiplier into a float and falls back to 1.0 when that fails
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return 1.0
    return cfg.number(value, where)


# ---------------------------------------------------------------------------------------------------------
# previews and checkpoints


def list_previews(job_dir: Path) -> tuple[list[Preview], list[str]]:
    """Previews in ``samples/`` sorted by save time, and warnings for files that were skipped."""
    samples_dir = job_dir / "samples"
    if not samples_dir.is_dir():
        raise InputError(
            samples_dir, f"no samples folder: no previews to replay (expected {PREVIEW_PATTERN})"
        )
    previews: list[Preview] = []
    warnings: list[str] = []
    for entry in sorted(_scan(samples_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue  # .tmp/ (in-flight writes), .thumbs/ (UI thumbnails), dotfiles
        if entry.is_dir():
            warnings.append(f"ignored folder samples/{entry.name}")
            continue
        match = _PREVIEW_RE.fullmatch(entry.name)
        if not entry.is_file() and (match is not None or _extension(entry.name) in _MEDIA_EXTS):
            # A FIFO or device named like an image: reading it would block or never end.
            raise InputError(Path(entry.path), f"{_entry_kind(entry)}: a preview must be a regular file")
        if match is None:
            if _extension(entry.name) in _MEDIA_EXTS:
                raise InputError(
                    Path(entry.path), f"not a preview: ai-toolkit names previews {PREVIEW_PATTERN}"
                )
            warnings.append(f"ignored samples/{entry.name}: not a preview")
            continue
        previews.append(
            Preview(
                file=entry.name,
                path=Path(entry.path),
                ms_time=int(match["ms"]),
                step=int(match["step"]),
                prompt_index=int(match["index"]),
                ext=match["ext"],
            )
        )
    if not previews:
        raise InputError(samples_dir, f"no previews (expected files named {PREVIEW_PATTERN})")
    previews.sort(key=lambda p: (p.ms_time, p.step, p.prompt_index, p.file))
    return previews, warnings


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _entry_kind(entry: os.DirEntry) -> str:
    """A non-regular directory entry in words: a FIFO, a device, a socket, a broken link."""
    try:
        return file_kind(entry.stat().st_mode)
    except OSError:
        return "a broken link" if entry.is_symlink() else "unreadable"


def list_checkpoints(job_dir: Path, name: str) -> list[Checkpoint]:
    """The job's LoRA checkpoints, intermediate ones by step, then the final one."""
    step_re = re.compile(re.escape(name) + r"_(\d{9,})\.safetensors")
    found: list[Checkpoint] = []
    for entry in _scan(job_dir):
        if not entry.is_file():
            continue
        if entry.name == f"{name}.safetensors":
            step, is_final = None, True
        elif (match := step_re.fullmatch(entry.name)) is not None:
            step, is_final = int(match[1]), False
        else:
            continue
        header = read_safetensors_header(Path(entry.path))
        metadata = header.get("__metadata__") or {}
        info = _training_info(metadata.get("training_info"))
        tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
        found.append(
            Checkpoint(
                file=entry.name,
                path=Path(entry.path),
                step=step,
                is_final=is_final,
                training_step=info.get("step"),
                epoch=info.get("epoch"),
                tensor_count=len(tensors),
                dtypes=tuple(sorted({str(t.get("dtype")) for t in tensors.values()})),
                metadata=dict(metadata),
            )
        )
    found.sort(key=lambda c: (c.is_final, c.step or 0))
    return found


def _scan(folder: Path) -> list[os.DirEntry]:
    try:
        return list(os.scandir(folder))
    except OSError as exc:
        raise InputError(folder, f"cannot read: {exc.strerror or exc}") from None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, ``__metadata__``), without its tensors."""
    try:
        with open_regular(path, "safetensors file") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise InputError(path, "not a safetensors file: shorter than its 8-byte header length")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > min(_MAX_HEADER_BYTES, os.fstat(f.fileno()).st_size - 8):
                raise InputError(path, f"not a safetensors file: header length {size} is beyond the file")
            header_bytes = f.read(size)
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(path, "not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise InputError(path, "not a safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InputError(path, "not a safetensors file: __metadata__ must map text to text")
    return header


def _training_info(text: str | None) -> dict[str, int]:
    if text is None:
        return {}
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(info, dict):
        return {}
    return {k: info[k] for k in ("step", "epoch") if isinstance(info.get(k), int)}
