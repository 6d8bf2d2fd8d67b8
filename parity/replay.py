"""Replay a plan's previews through their model family's reference pipeline: one base load per run.

The ``Replayer`` turns a plan item into the seam's plain values (``pipelines.family``): the weights ai-toolkit
sampled it with (base drifted by earlier merged rounds when their weights exist, then the round's LoRA merged or
attached as hooks) and the render request. The family's session does the torch work. The Replayer also names the
residual the files cannot remove (a LoRA rounded to float16, an earlier checkpoint deleted) and keys the replay
cache by everything that determines the pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity import __version__, calibrate
from parity.errors import EnvironmentProblem, InputError
from parity.plan import ReplayItem, ReplayPlan
from pipelines.family import Family, LoadSpec, ModelDirError, RenderRequest, WeightState
from pipelines.registry import family_for

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32"}
NOISE_CANDIDATES = calibrate.NOISE_CANDIDATES
SERVER_MODES = ("server", "adapter")  # Knobs.merge_mode values that replace ai-toolkit's way with a server's


@dataclass
class ReplayOptions:
    """How to replay. Defaults reproduce the previews; every field is a named knob."""

    base_model: str | None = None  # overrides the config's model.name_or_path (a training-machine path)
    device: str = "cpu"
    dtype: str | None = None  # default: the job's train.dtype
    noise_algorithm: str = "auto"  # a pipelines.common.noise name, "native", or "auto" (from step-0 previews)
    lora_overrides: dict[int, Path] = field(default_factory=dict)  # step -> LoRA file used instead
    reproduce_drift: bool = True  # replay earlier merge/un-merge rounds onto the base
    kernel_profile: str = "auto"  # the family's kernel spec, or "auto" (from step-0 previews on CUDA)
    kernel_search: int = 6  # most kernel profiles tried by the automatic choice
    # --fast: the family's faster path (Family.fast_changes; torch.compile on CUDA): last bits may differ
    fast: bool = False
    cuda_graphs: bool = True  # capture each denoising step as a CUDA graph (same kernels, same bits)
    compile: bool | None = None  # torch.compile the --fast blocks (default: with --fast on CUDA)
    cpu_profile: str = "native"  # the CPU kernel profile the process runs under (part of the cache key)


@dataclass(frozen=True)
class Knobs:
    """Replay choices beyond the plan item's own values. The defaults are ai-toolkit's preview behaviour; each
    field is a named knob that diagnosis flips one at a time (item values such as seed or steps are flipped by
    replacing fields of the ReplayItem instead)."""

    options: tuple[tuple[str, object], ...] = ()  # family-specific (pipelines.family.KnobFlip.options)
    te_quantized: bool | None = None  # None: as the job did (model.quantize_te)
    lora: bool = True  # False: the base model alone
    # "aitoolkit": as the round did; "server": file-dtype B@A added in bf16; "adapter": a bf16 PEFT adapter
    merge_mode: str = "aitoolkit"
    output_size: str = "saved"  # "generation": return the generated image, not resized back (servers)

    def changed(self) -> dict:
        """The knobs that differ from ai-toolkit's defaults."""
        default = Knobs()
        return {k: v for k, v in self.__dict__.items() if getattr(default, k) != v}


@dataclass
class Replay:
    """One finished replay."""

    pixels: np.ndarray | None
    key: str  # hash of everything that determines the pixels
    weights: str  # what the transformer ran with, in words
    residuals: list[str]  # known sources of difference that the files cannot remove
    lora_problem: str | None = None  # unmatched LoRA keys, named
    pending: object | None = None  # a deferred render (pixels is None until ``wait``)
    cached: bool = False  # the pixels came from the replay cache (replay_or_cached), not from a replay

    def wait(self) -> np.ndarray:
        """The pixels, waiting for a deferred replay's decode and copy if needed."""
        if self.pixels is None:
            self.pixels = self.pending.wait()
            self.pending = None
        return self.pixels


@dataclass(frozen=True)
class Prepared:
    """A plan item's weights in the seam's terms, and what a report says about them."""

    state: WeightState
    weights: str  # in words
    residuals: list[str]
    lora_paths: tuple[Path, ...]  # every LoRA file the state reads (its digests go into the cache key)


def torch_dtype_name(name: str) -> str:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise InputError(None, f"unknown dtype {name!r}; use bf16, fp16 or fp32") from None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Replayer:
    """Loads the base model once (through its family) and replays plan items in any order."""

    def __init__(self, plan: ReplayPlan, options: ReplayOptions):
        self.plan = plan
        self.options = options
        self.family: Family = family_for(plan.arch)
        self.job_dir = Path(plan.job_dir)
        self.dtype_name = torch_dtype_name(options.dtype or plan.train_dtype)
        self.noise_algorithm = options.noise_algorithm
        self.noise_reason = "given with --noise"
        self.kernel_reason = "given with --kernels"
        self.kernel_trials: list[dict] = []  # each kernel profile tried by choose_kernels, against its probe
        self.session = None
        self._loras: dict[Path, object] = {}
        self._digests: dict[Path, str] = {}
        self.load_timings: dict[str, float] = {}  # seconds per part of the base load

    # -- loading -------------------------------------------------------------------------------------------
    def base_model_path(self) -> str:
        base = self.options.base_model or self.plan.extras_model or self.plan.base_model
        if not base:
            raise InputError(self.plan.config_file, "model.name_or_path is not set; pass --base-model")
        return base

    def load(self) -> None:
        """Load the base model (once). Raises EnvironmentProblem/InputError with one clear line."""
        if self.session is not None:
            return
        import torch

        from pipelines.common.files import resolve_model_dir
        from pipelines.common.quantize import QuantizeError

        if self.options.device.startswith("cuda") and not torch.cuda.is_available():
            raise EnvironmentProblem(None, "CUDA was asked for (--device cuda) but torch sees no CUDA device")
        try:
            root = resolve_model_dir(self.base_model_path())
            self.family.check_model_dir(root)
            self.session = self.family.load(self.load_spec(root))
        except ModelDirError as exc:
            hint = "" if self.options.base_model else " (the config's path; pass --base-model PATH|ID)"
            if exc.missing:
                raise EnvironmentProblem(exc.path, f"base model not found{hint}") from None
            raise InputError(exc.path, exc.problem) from None
        except QuantizeError as exc:
            raise (EnvironmentProblem if exc.missing_package else InputError)(None, exc.problem) from None
        except ValueError as exc:  # a kernel profile the family does not know
            raise InputError(None, f"--kernels: {exc}") from None
        except RuntimeError as exc:
            raise EnvironmentProblem(None, str(exc)) from None
        if self.options.kernel_profile == "auto":
            self.kernel_reason = getattr(self.session, "kernel_reason", self.kernel_reason)
        self.load_timings = dict(self.session.timings)

    def load_spec(self, root: Path) -> LoadSpec:
        plan, options = self.plan, self.options
        return LoadSpec(root=root, dtype=self.dtype_name, device=options.device, quantize=plan.quantize,
                        qtype=plan.qtype, quantize_te=plan.quantize_te, qtype_te=plan.qtype_te,
                        kernels=options.kernel_profile, fast=options.fast, cuda_graphs=options.cuda_graphs,
                        compile=options.compile, model_kwargs=dict(plan.model_flags))

    # -- kernels (the session's, as values) ----------------------------------------------------------------
    @property
    def kernels(self) -> str:
        return self.session.kernels if self.session is not None else "torch"

    def set_kernels(self, spec: str) -> None:
        self.session.set_kernels(spec)

    def kernel_candidates(self) -> list[str]:
        return self.session.kernel_candidates(self.options.kernel_search)

    # -- weights -------------------------------------------------------------------------------------------
    def lora_path(self, step: int, checkpoint: str | None) -> Path | None:
        if step in self.options.lora_overrides:
            return Path(self.options.lora_overrides[step])
        if checkpoint:
            return self.job_dir / checkpoint
        return None

    def read_lora(self, path: Path):
        from pipelines.common.lora import LoraError

        self.load()
        if path not in self._loras:
            if not path.is_file():
                raise InputError(path, "LoRA file not found")
            try:
                self._loras[path] = self.session.read_lora(path)
            except LoraError as exc:
                raise InputError(exc.path, exc.problem) from None
            self._digests[path] = file_digest(path)
        return self._loras[path]

    def merge_history(self, item: ReplayItem) -> tuple[list[tuple[Path, float]], list[int]]:
        """Earlier merged rounds whose merge/un-merge drifted the base before ``item``'s round."""
        history, missing = [], []
        rounds: dict[tuple[int, str], list[ReplayItem]] = {}
        for other in self.plan.items:
            if other.step < item.step and other.lora_merged and other.weights != "base":
                rounds.setdefault((other.step, other.round), []).append(other)
        for (step, _), members in sorted(rounds.items()):
            path = self.lora_path(step, members[0].checkpoint)
            if path is None or not path.is_file():
                missing.append(step)
                continue
            history.append((path, float(members[0].network_multiplier or 1.0)))
        return history, missing

    def weights_for(self, item: ReplayItem, knobs: Knobs) -> Prepared:
        """``item``'s weight state and what to say about it (torch-free but for reading the LoRA files)."""
        use_lora = item.weights != "base" and knobs.lora
        path = self.lora_path(item.step, item.checkpoint) if use_lora else None
        multiplier = float(item.network_multiplier if item.network_multiplier is not None else 1.0)
        server = knobs.merge_mode in SERVER_MODES
        merged = bool(item.lora_merged) and not self.plan.quantize
        history, missing = [], []
        if path is not None and merged and self.options.reproduce_drift and not server:
            history, missing = self.merge_history(item)
        mode = knobs.merge_mode if server else ("merged" if merged else "hooks")
        state = WeightState(path, multiplier, mode, tuple(history))
        if path is None:
            words = "base model (step 0: the LoRA was still zero)" if item.step == 0 else "base model"
            return Prepared(state, words, [], ())
        lora = self.read_lora(path)
        residuals = []
        source = "override" if item.step in self.options.lora_overrides else "checkpoint"
        if source == "checkpoint" and any(d in ("float16", "bfloat16") for d in lora.dtypes):
            residuals.append(f"fp16-rounded LoRA: {path.name} is the fp32 LoRA rounded to {'/'.join(lora.dtypes)}")
        if missing:
            residuals.append("merge drift not reproduced: checkpoint of earlier merged step(s) "
                             f"{', '.join(map(str, missing))} missing")
        rounded = [p.name for p, _ in history if p.parent == self.job_dir and "float16" in self.read_lora(p).dtypes]
        if rounded:
            residuals.append(f"merge drift replayed from float16 checkpoints ({', '.join(rounded)}), not the fp32 weights")
        how = {"merged": "merged", "hooks": "unmerged side branch", "server": "fused like the server",
               "adapter": "bf16 adapter like the server"}[mode]
        words = f"{path.name} ({source}, {how} x{multiplier:g}, {{layers}} layers)"
        if history:
            words += f", base drifted by {len(history)} earlier merge round(s)"
        return Prepared(state, words, residuals, (path, *(p for p, _ in history)))

    def _apply(self, item: ReplayItem, knobs: Knobs) -> tuple[dict, list]:
        """Put the transformer in ``item``'s state; returns (what it ran with, the weights' cache-key parts)."""
        self.load()
        prepared = self.weights_for(item, knobs)
        problem, weights = None, prepared.weights
        if prepared.state.lora is not None:
            report = self.session.match_lora(self.read_lora(prepared.state.lora))
            problem = report.problem()
            weights = weights.replace("{layers}", str(len(report.matched)))
        self.session.set_weights(prepared.state)
        state = prepared.state
        key_parts = [
            self._digests.get(state.lora) if state.lora else None,
            state.mode,
            state.multiplier,
            [(self._digests[p], m) for p, m in state.history],
            knobs.merge_mode,
        ]
        return {"weights": weights, "residuals": prepared.residuals, "lora_problem": problem}, key_parts

    # -- calibration ---------------------------------------------------------------------------------------
    def step0_probes(self) -> list[ReplayItem]:
        """Previews of the base model alone (step 0): only noise and kernels set their pixels."""
        return [i for i in self.plan.items if i.step == 0 and i.replayable and i.weights == "base"]

    def probing(self, score_fn, part=(0, 1), gather=None, on_replay=None, lookup=None) -> calibrate.Probing:
        """The choices' replay and score callables over this replayer (``lookup``: the replay cache)."""
        return calibrate.Probing(
            replay=lambda item, algorithm, deferred: self.replay_or_cached(item, algorithm, lookup, deferred),
            score=score_fn, on_replay=on_replay, on_gpu=self.options.device.startswith("cuda"),
            part=part, gather=gather)

    def choose_noise_algorithm(self, score_fn, max_previews: int = 2, part: tuple[int, int] = (0, 1), gather=None,
                               on_replay=None, clear_ssim: float = 0.90,
                               unrelated_ssim: float = calibrate.CLEARLY_UNRELATED_SSIM, lookup=None) -> tuple[str, str]:
        """With ``--noise auto``: the draw that reproduces the step-0 previews (``calibrate.choose_noise``)."""
        from pipelines.common import noise

        if self.noise_algorithm != "auto":
            return self.noise_algorithm, self.noise_reason
        probes = self.step0_probes()[:max_previews]
        native = str(noise.detect_native_algorithm(probe=False))
        draws = calibrate.distinct_draws(lambda name: self._noise_for(probes[0], name)) if probes else {}
        self.noise_algorithm, self.noise_reason = calibrate.choose_noise(
            probes, draws, native, self.probing(score_fn, part, gather, on_replay, lookup), clear_ssim, unrelated_ssim)
        return self.noise_algorithm, self.noise_reason

    def fall_back_noise(self, why: str) -> None:
        """No choice could be made (a probe crashed): this torch's own draw, and why."""
        from pipelines.common import noise

        self.noise_algorithm = str(noise.detect_native_algorithm(probe=False))
        self.noise_reason = f"this torch's own draw: {why}"

    def choose_kernels(self, score_fn, part: tuple[int, int] = (0, 1), gather=None, on_replay=None, lookup=None,
                       max_probes: int | None = None) -> tuple[str, str]:
        """With ``--kernels auto``: the family's kernel profile that reproduces the step-0 previews bit for bit
        (``calibrate.choose_kernels``); a family or device with one candidate keeps it. ``max_probes``: check
        only the first so many step-0 previews (a run that does not check them itself)."""
        self.load()
        candidates = self.kernel_candidates()
        if self.options.kernel_profile != "auto" or len(candidates) < 2:
            return self.kernels, self.kernel_reason
        every_probe = self.step0_probes()
        probes = every_probe[:max_probes] if max_probes else every_probe

        def first_cached() -> bool:
            # The likeliest set's first replay is in the cache on every rank (the noise choice ran with it): then
            # it is checked there for free first, and no rank spends a replay screening a less likely set.
            if lookup is None:
                return False
            self.set_kernels(candidates[0])
            have = lookup(probes[0], self.prepare(probes[0])[0]) is not None
            return all((gather({part[0]: have}) if gather is not None else {part[0]: have}).values())

        chosen, self.kernel_reason, self.kernel_trials = calibrate.choose_kernels(
            probes, len(every_probe), candidates, self.set_kernels,
            self.probing(score_fn, part, gather, on_replay, lookup), first_cached)
        return chosen, self.kernel_reason

    def fast_drift(self, probes: list[ReplayItem]) -> dict | None:
        """``--fast`` against exact mode on the same previews: both replayed here, pixels compared (the drift the
        report header shows for a ``--fast`` run)."""
        from parity.scores import compute_metrics

        if not self.options.fast or not probes:
            return None
        rows = []
        for item in probes:
            fast = self.replay(item).pixels
            self.session.fast = False
            try:
                exact = self.replay(item).pixels
            finally:
                self.session.fast = True
            metrics = compute_metrics(exact, fast)[0]
            rows.append({"preview": item.file, "ssim": round(float(metrics.ssim), 5),
                         "max_abs_diff": int(metrics.max_abs_diff),
                         "mean_abs_diff": round(float(metrics.mean_abs_diff), 4)})
        return {"what": "--fast vs exact mode", "previews": rows,
                "ssim_min": min(r["ssim"] for r in rows), "max_abs_diff": max(r["max_abs_diff"] for r in rows)}

    def _noise_for(self, item: ReplayItem, algorithm: str) -> np.ndarray:
        self.load()
        return self.session.noise(self.request(item, algorithm), algorithm)

    # -- replay --------------------------------------------------------------------------------------------
    def request(self, item: ReplayItem, algorithm: str, knobs: Knobs = Knobs()) -> RenderRequest:
        from PIL import Image

        options = tuple(knobs.options)
        if knobs.te_quantized is not None:
            options += (("te_quantized", knobs.te_quantized),)
        return RenderRequest(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt or "",
            seed=int(item.seed),
            width=int(item.width),
            height=int(item.height),
            num_inference_steps=int(item.num_inference_steps),
            guidance_scale=float(item.guidance_scale),
            noise_algorithm=algorithm,
            reference_images=(Image.open(item.ctrl_img),) if item.ctrl_img else (),
            options=options,
            output_size=knobs.output_size,
        )

    def cache_key(self, item: ReplayItem, algorithm: str, key_parts: list, knobs: Knobs = Knobs()) -> str:
        fields = {
            "parity": __version__,
            "family": self.family.name,
            "base": self.session.fingerprint if self.session is not None else None,
            "item": {k: getattr(item, k) for k in (
                "prompt", "negative_prompt", "seed", "width", "height", "num_inference_steps",
                "guidance_scale", "ctrl_img")},
            "ctrl": file_digest(Path(item.ctrl_img)) if item.ctrl_img else None,
            "weights": key_parts,
            "noise": algorithm,
            "dtype": self.dtype_name,
            "device": self.options.device,
            "kernels": self.kernels,
            "cpu": self.options.cpu_profile if self.options.device == "cpu" else None,
            "quantize": [self.plan.quantize, self.plan.qtype, self.plan.quantize_te, self.plan.qtype_te],
            "model_flags": self.plan.model_flags,
            "knobs": knobs.changed(),
        }
        if self.options.fast:
            fields["mode"] = "fast"
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def prepare(self, item: ReplayItem, algorithm: str | None = None, knobs: Knobs = Knobs()) -> tuple[str, dict]:
        """Apply ``item``'s weights and return its cache key and what the replay ran with (no pixels yet)."""
        algorithm = algorithm or self.noise_algorithm
        info, parts = self._apply(item, knobs)
        info["noise"] = algorithm
        return self.cache_key(item, algorithm, parts, knobs), info

    def replay(self, item: ReplayItem, algorithm: str | None = None, knobs: Knobs = Knobs(),
               deferred: bool = False) -> Replay:
        """Replay ``item`` (which must be replayable) with ``knobs`` and return its pixels. ``deferred``: return
        once the decode is queued; ``Replay.wait()`` gives the pixels (from any thread)."""
        if not item.replayable:
            raise ValueError(f"{item.file} is not replayable: {item.reason}")
        algorithm = algorithm or self.noise_algorithm
        if algorithm == "auto":
            raise ValueError("choose the noise algorithm first (choose_noise_algorithm)")
        key, info = self.prepare(item, algorithm, knobs)
        rendered = self.session.render(self.request(item, algorithm, knobs), deferred=deferred)
        replay = Replay(None, key, info["weights"], info["residuals"], info["lora_problem"], pending=rendered)
        if not deferred:
            replay.wait()
        return replay

    def replay_or_cached(self, item: ReplayItem, algorithm: str | None = None, lookup=None,
                         deferred: bool = False, knobs: Knobs = Knobs()) -> Replay:
        """``item``'s replay, or the pixels ``lookup(item, key)`` finds in the replay cache for its key (then
        nothing is replayed: ``Replay.cached``)."""
        if lookup is not None:
            key, info = self.prepare(item, algorithm, knobs)
            pixels = lookup(item, key)
            if pixels is not None:
                return Replay(pixels, key, info["weights"], info["residuals"], info["lora_problem"], cached=True)
        return self.replay(item, algorithm, knobs=knobs, deferred=deferred)
