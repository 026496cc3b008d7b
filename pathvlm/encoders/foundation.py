"""The field's pathology foundation encoders as registry entries: one `FoundationSpec` each.

Facts (architecture arguments, input size, scale, normalisation, pooling, licence, gating) come
from the public model cards and their authors' loading code; `foundation_models.py` builds and
loads them. Every entry is registered into the one encoder registry, so `list_encoders()` stays
the single list. Weights are never bundled: pass the hub folder (copied as is) or one weights file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pathvlm.encoders.registry import EncoderEntry, register_encoder

FOUNDATION_PREFIX = "foundation:"

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # kaiko, Midnight; timm's "inception" constants (MUSK)
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

TIMM_FILES = ("pytorch_model.bin", "model.safetensors")
HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class FoundationSpec:
    """One published encoder: how to build it, feed it and pool it, and under which terms.

    Attributes:
        family: builder in foundation_models: ``timm``, ``ctranspath``, ``conch_v15``,
            ``hf_vit``, ``hf_dinov2``, ``hf_dinov2_reg``, ``hf_clip``, ``open_clip``,
            ``conch`` (needs the ``conch`` package), ``musk`` (needs ``musk``), ``remote_code``.
        arch: timm model name, or the architecture class its config names.
        kwargs: timm create_model arguments (layer classes by name, resolved at build), or the
            published config.json values used when only a weights file is given.
        pooling: ``cls`` (class token), ``cls+mean`` (class token + mean of patch tokens, register
            tokens excluded), ``avg`` (mean over the final feature map), ``attn_pool`` (attentional
            pooler), ``clip`` (the CLIP image projection, shared space with the text tower).
        mpp: um/px of the tiles it was trained on (20x ~ 0.5); ``tile_px``: tile side read at that
            scale before the transform resizes it to ``input_size``.
        files: weights file names in the hub folder, first found wins.
    """

    name: str
    hub_id: str
    family: str
    arch: str
    embed_dim: int
    input_size: int
    mpp: float
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]
    pooling: str
    license: str
    gated: bool
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    has_text: bool = False
    files: tuple[str, ...] = TIMM_FILES
    interpolation: str = "bicubic"
    tile_px: int | None = None
    package: str | None = None
    scale_note: str = "20x"

    @property
    def tile_size(self) -> int:
        return self.tile_px or self.input_size

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip PreprocessCfg: shortest side to ``input_size``, centre crop, normalise."""
        mean, std = self.mean_std
        return {"size": self.input_size, "mean": list(mean), "std": list(std),
                "interpolation": self.interpolation, "resize_mode": "shortest"}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = (list(v) for v in data.pop("mean_std"))
        data["tile_size"] = self.tile_size
        return data


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
_VIT_L16 = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
            "dynamic_img_size": True}
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
            "global_pool": "", "dynamic_img_size": True, **_SWIGLU}
_HOPTIMUS = {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
             "dynamic_img_size": False}
_NC_ND = "CC-BY-NC-ND-4.0"


def _kaiko(size: str, arch: str, dim: int, img: int = 224) -> FoundationSpec:
    return FoundationSpec(
        f"kaiko-{size}", f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms", "timm", arch, dim,
        224, 0.5, HALF, "cls", "other (kaiko.ai model licence; see the hub card)", False,
        f"kaiko.ai {size.upper()} DINO(v2) on TCGA (Towards Large-Scale Training of Pathology FMs)",
        {"img_size": img, "num_classes": 0, "dynamic_img_size": True},
        files=("model.safetensors", "pytorch_model.bin"), interpolation="bilinear",
        scale_note="multi-scale (5x-40x)")


def _hf_dinov2(hidden: int, layers: int, heads: int, patch: int, image: int,
               swiglu: bool, registers: int | None = None) -> dict[str, Any]:
    cfg = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
           "patch_size": patch, "image_size": image, "use_swiglu_ffn": swiglu, "mlp_ratio": 4,
           "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "qkv_bias": True}
    if registers is not None:
        cfg["num_register_tokens"] = registers
    return cfg


FOUNDATION_SPECS: tuple[FoundationSpec, ...] = (
    FoundationSpec("uni", "MahmoodLab/UNI", "timm", "vit_large_patch16_224", 1024, 224, 0.5,
                   IMAGENET, "cls", _NC_ND, True,
                   "UNI ViT-L/16 DINOv2 on Mass-100K (MahmoodLab)", _VIT_L16),
    FoundationSpec("uni2-h", "MahmoodLab/UNI2-h", "timm", "vit_giant_patch14_224", 1536, 224, 0.5,
                   IMAGENET, "cls", _NC_ND, True,
                   "UNI2-h ViT-H/14 (SwiGLU, 8 registers) on 200M+ tiles (MahmoodLab)",
                   {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                    "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                    "num_classes": 0, "no_embed_class": True, "reg_tokens": 8,
                    "dynamic_img_size": True, **_SWIGLU}),
    FoundationSpec("conch-v1", "MahmoodLab/CONCH", "conch", "conch_ViT-B-16", 512, 448, 0.5,
                   OPENAI_CLIP, "clip", _NC_ND, True,
                   "CONCH ViT-B/16 CoCa-style vision-language model (image + text; needs the "
                   "authors' `conch` package)", has_text=True, files=("pytorch_model.bin",),
                   package="conch"),
    FoundationSpec("conch-v1.5", "MahmoodLab/conchv1_5", "conch_v15", "vit_large_patch16_224",
                   768, 448, 0.5, IMAGENET, "attn_pool", _NC_ND, True,
                   "CONCH v1.5 vision tower (ViT-L/16 + attentional pooler, TITAN's patch encoder); "
                   "its text tower is not public",
                   {"img_size": 448, "patch_size": 16, "init_values": 1.0, "num_classes": 0},
                   files=("pytorch_model_vision.bin",), interpolation="bilinear", tile_px=512),
    FoundationSpec("virchow", "paige-ai/Virchow", "timm", "vit_huge_patch14_224", 2560, 224, 0.5,
                   IMAGENET, "cls+mean", "Apache-2.0", True,
                   "Virchow ViT-H/14 DINOv2 on 1.5M slides (Paige)", _VIRCHOW),
    FoundationSpec("virchow2", "paige-ai/Virchow2", "timm", "vit_huge_patch14_224", 2560, 224, 0.5,
                   IMAGENET, "cls+mean", _NC_ND, True,
                   "Virchow2 ViT-H/14 (4 registers) on 3.1M slides, mixed magnification (Paige)",
                   {**_VIRCHOW, "reg_tokens": 4}, scale_note="multi-scale (5x-40x)"),
    FoundationSpec("gigapath", "prov-gigapath/prov-gigapath", "timm", "vit_giant_patch14_dinov2",
                   1536, 224, 0.5, IMAGENET, "cls", "Apache-2.0", True,
                   "Prov-GigaPath tile encoder, ViT-g/16 DINOv2 on 1.3B tiles (Providence/Microsoft)",
                   {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                    "depth": 40, "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
                    "num_classes": 0, "dynamic_img_size": True}, tile_px=256),
    FoundationSpec("h-optimus-0", "bioptimus/H-optimus-0", "timm", "vit_giant_patch14_reg4_dinov2",
                   1536, 224, 0.5, BIOPTIMUS, "cls", "Apache-2.0", True,
                   "H-optimus-0 ViT-g/14 (4 registers) on 500K slides (Bioptimus)", _HOPTIMUS),
    FoundationSpec("h-optimus-1", "bioptimus/H-optimus-1", "timm", "vit_giant_patch14_reg4_dinov2",
                   1536, 224, 0.5, BIOPTIMUS, "cls", "other (Bioptimus non-commercial)", True,
                   "H-optimus-1 ViT-g/14 (4 registers) on 1M+ slides (Bioptimus)", _HOPTIMUS),
    FoundationSpec("h0-mini", "bioptimus/H0-mini", "timm", "vit_base_patch14_reg4_dinov2", 1536,
                   224, 0.5, BIOPTIMUS, "cls+mean", _NC_ND, True,
                   "H0-mini ViT-B/14 distilled from H-optimus-0 (Bioptimus)",
                   {"img_size": 224, "num_classes": 0, "dynamic_img_size": True, **_SWIGLU}),
    FoundationSpec("phikon", "owkin/phikon", "hf_vit", "ViTModel", 768, 224, 0.5, IMAGENET, "cls",
                   "other (Owkin non-commercial)", False,
                   "Phikon ViT-B/16 iBOT on 40M TCGA tiles (Owkin; transformers ViTModel)",
                   {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                    "qkv_bias": True, "layer_norm_eps": 1e-12},
                   files=HF_FILES, interpolation="bilinear"),
    FoundationSpec("phikon-v2", "owkin/phikon-v2", "hf_dinov2", "Dinov2Model", 1024, 224, 0.5,
                   IMAGENET, "cls", "other (Owkin non-commercial)", False,
                   "Phikon-v2 ViT-L/16 DINOv2 on 460M tiles (Owkin; transformers Dinov2Model)",
                   _hf_dinov2(1024, 24, 16, 16, 224, swiglu=False), files=HF_FILES),
    FoundationSpec("gpfm", "majiabo/GPFM", "timm", "vit_large_patch14_dinov2", 1024, 224, 0.5,
                   IMAGENET, "cls", "CC-BY-NC-ND-4.0", False,
                   "GPFM ViT-L/14 (unified knowledge distillation; HKUST)",
                   {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                    "dynamic_img_size": True}, files=("GPFM.pth",)),
    FoundationSpec("pathorchestra", "AI4Pathology/PathOrchestra", "timm", "vit_large_patch16_224",
                   1024, 224, 0.5, IMAGENET, "cls", _NC_ND, True,
                   "PathOrchestra ViT-L/16 on 300K slides from 20 tissue types", _VIT_L16),
    FoundationSpec("ctranspath", "MahmoodLab/hest-bench:fm_v1/ctranspath", "ctranspath",
                   "swin_tiny_patch4_window7_224", 768, 224, 1.0, IMAGENET, "avg", "GPL-3.0",
                   True,
                   "CTransPath Swin-T with convolutional stem, SRCL on TCGA+PAIP (weights as "
                   "CHIEF_CTransPath.pth / ctranspath.pth)",
                   {"img_size": 224, "num_classes": 0},
                   files=("CHIEF_CTransPath.pth", "ctranspath.pth"), interpolation="bilinear",
                   scale_note="10x"),
    FoundationSpec("hibou-b", "histai/hibou-b", "hf_dinov2_reg", "Dinov2ModelWithRegisters", 768,
                   224, 0.5, HIBOU, "cls", "Apache-2.0", False,
                   "Hibou-B ViT-B/14 DINOv2 (4 registers, SwiGLU) on 1.1M slides (HistAI)",
                   _hf_dinov2(768, 12, 12, 14, 224, swiglu=True, registers=4), files=HF_FILES),
    FoundationSpec("hibou-l", "histai/hibou-L", "hf_dinov2_reg", "Dinov2ModelWithRegisters", 1024,
                   224, 0.5, HIBOU, "cls", "Apache-2.0", True,
                   "Hibou-L ViT-L/14 DINOv2 (4 registers, SwiGLU) on 1.1M slides (HistAI)",
                   _hf_dinov2(1024, 24, 16, 14, 224, swiglu=True, registers=4), files=HF_FILES),
    _kaiko("vits8", "vit_small_patch8_224", 384),
    _kaiko("vits16", "vit_small_patch16_224", 384),
    _kaiko("vitb8", "vit_base_patch8_224", 768),
    _kaiko("vitb16", "vit_base_patch16_224", 768),
    _kaiko("vitl14", "vit_large_patch14_reg4_dinov2", 1024, img=518),
    FoundationSpec("midnight-12k", "kaiko-ai/midnight", "hf_dinov2", "Dinov2Model", 3072, 224,
                   0.5, HALF, "cls+mean", "MIT", True,
                   "Midnight-12k ViT-g/14 DINOv2 on 12K TCGA slides (kaiko.ai)",
                   _hf_dinov2(1536, 40, 24, 14, 224, swiglu=True), files=HF_FILES,
                   scale_note="multi-scale (0.25-2 um/px)"),
    FoundationSpec("lunit-vits8", "1aurent/vit_small_patch8_224.lunit_dino", "timm",
                   "vit_small_patch8_224", 384, 224, 0.5, LUNIT, "cls",
                   "other (Lunit non-commercial)", False,
                   "Lunit DINO ViT-S/8 on 33M tiles (Benchmarking SSL on pathology)",
                   {"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
                   files=("model.safetensors", "pytorch_model.bin"), scale_note="20x and 40x"),
    FoundationSpec("plip", "vinid/plip", "hf_clip", "CLIPModel", 512, 224, 0.5, OPENAI_CLIP,
                   "clip", "MIT", False,
                   "PLIP CLIP ViT-B/32 fine-tuned on OpenPath (Twitter) image-text pairs",
                   {"projection_dim": 512,
                    "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                                      "num_hidden_layers": 12, "num_attention_heads": 12,
                                      "image_size": 224, "patch_size": 32},
                    "text_config": {"hidden_size": 512, "intermediate_size": 2048,
                                    "num_hidden_layers": 12, "num_attention_heads": 8,
                                    "max_position_embeddings": 77, "vocab_size": 49408}},
                   has_text=True, files=("pytorch_model.bin", "model.safetensors"),
                   scale_note="mixed (educational images)"),
    FoundationSpec("quiltnet-b-32", "wisdomik/QuiltNet-B-32", "open_clip", "ViT-B-32", 512, 224,
                   0.5, OPENAI_CLIP, "clip", "MIT", False,
                   "QuiltNet CLIP ViT-B/32 on Quilt-1M (open_clip)", has_text=True,
                   files=("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
                   scale_note="mixed (video frames)"),
    FoundationSpec("keep", "Astaxanthin/KEEP", "remote_code", "KEEPModel", 768, 224, 0.5, IMAGENET,
                   "clip", "MIT", False,
                   "KEEP knowledge-enhanced vision-language model (UNI-initialised ViT-L + "
                   "PubMedBERT); its architecture ships only as hub remote code",
                   has_text=True, files=HF_FILES),
    FoundationSpec("musk", "xiangjx/musk", "musk", "musk_large_patch16_384", 1024, 384, 0.5, HALF,
                   "cls", _NC_ND, True,
                   "MUSK BEiT-3 style vision-language model (needs the authors' `musk` package)",
                   files=("model.safetensors",), package="musk"),
)

_SPECS = {spec.name: spec for spec in FOUNDATION_SPECS}


def get_foundation_spec(name: str) -> FoundationSpec | None:
    return _SPECS.get(name)


def list_foundation_specs() -> list[FoundationSpec]:
    return list(FOUNDATION_SPECS)


for _spec in FOUNDATION_SPECS:
    register_encoder(EncoderEntry(
        name=_spec.name, spec=FOUNDATION_PREFIX + _spec.name, license=_spec.license,
        gated=_spec.gated, description=_spec.description, has_text=_spec.has_text,
        needs_internet=True, embed_dim=_spec.embed_dim, mpp=_spec.mpp,
        input_size=_spec.input_size, hub_id=_spec.hub_id, family=_spec.family))
