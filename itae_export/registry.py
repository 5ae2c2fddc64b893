"""The one registry of models: architecture, weight sources, ITAE defaults, preprocessing.

Everything else (the CLI choices, the docs table, the exporter, the loaders) reads from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from itae_export.errors import OptionError, UnknownModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
CLIP_URL = "https://openaipublic.azureedge.net/clip/models"
DEIT_URL = "https://dl.fbaipublicfiles.com/deit"

# Position-embedding interpolation rules (see vit.interpolate_pos_table).
POS_RULES = ("none", "dinov2-offset", "bicubic", "bicubic-aa")


@dataclass(frozen=True)
class ArchConfig:
    """Hyper-parameters of the one ViT implementation (itae_export.model.vit.VisionTransformer)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    pos_grid: int  # side of the square position table the weights carry
    ffn: str = "mlp"  # "mlp" or "swiglu"
    act: str = "gelu"  # "gelu" (erf) or "quick_gelu"
    layerscale: bool = True
    num_register_tokens: int = 0
    pos_embed_cls: bool = True  # the table holds a CLS row (DINOv2, CLIP) or not (DeiT III)
    pre_norm: bool = False  # CLIP's ln_pre
    patch_bias: bool = True  # CLIP's conv1 has no bias
    proj_dim: int | None = None  # CLIP's image projection
    norm_eps: float = 1e-6
    mask_token: bool = False  # DINOv2 checkpoints carry an (unused) mask token

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def out_dim(self) -> int:
        return self.proj_dim or self.embed_dim


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the model. Exported into every model's metadata."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resolution: int = 224
    resize: str = "squash"  # "squash": straight to HxW, as the paper does
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "resolution": [self.resolution, self.resolution],
            "resize": self.resize,
            "interpolation": self.interpolation,
            "scale": 1 / 255,
            "channel_order": "RGB",
            "layout": "NCHW",
        }


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: an architecture plus where its weights come from."""

    name: str
    family: str  # "dinov2", "clip", "deit3"
    arch: ArchConfig
    theta: float
    preprocessing: Preprocessing
    url: str | None = None  # official checkpoint
    hf_hub_id: str | None = None  # the Hugging Face hub repository
    pos_rule: str = "none"  # interpolation rule for the official weights
    hf_pos_rule: str | None = None  # interpolation rule of the transformers implementation
    theta_note: str = ""
    aliases: tuple[str, ...] = ()
    weight_format: str = ""  # format of `url`: dinov2-hub, openai-clip, deit-official

    @property
    def embed_dim(self) -> int:
        return self.arch.out_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["embed_dim"] = self.embed_dim
        return d


_REGISTRY: dict[str, ModelSpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _dinov2(size: str, dim: int, depth: int, heads: int, reg: bool, theta: float, note: str = "") -> None:
    arch_name = {"s": "vits14", "b": "vitb14", "l": "vitl14", "g": "vitg14"}[size]
    name = f"dinov2_{arch_name}" + ("_reg" if reg else "")
    full = f"dinov2_{arch_name}" + ("_reg4" if reg else "")
    hf_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    giant = size == "g"
    arch = ArchConfig(
        patch_size=14,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        # SwiGLUFFNFused: hidden = int(4 * dim * 2 / 3) rounded up to a multiple of 8
        mlp_hidden=((int(dim * 4 * 2 / 3) + 7) // 8 * 8) if giant else dim * 4,
        pos_grid=37,
        ffn="swiglu" if giant else "mlp",
        num_register_tokens=4 if reg else 0,
        mask_token=True,
    )
    register(
        ModelSpec(
            name=name,
            family="dinov2",
            arch=arch,
            theta=theta,
            theta_note=note,
            preprocessing=Preprocessing(IMAGENET_MEAN, IMAGENET_STD),
            url=f"{DINOV2_URL}/dinov2_{arch_name}/{full}_pretrain.pth",
            hf_hub_id=f"facebook/dinov2-{'with-registers-' if reg else ''}{hf_size}",
            # official hub models: offset+scale_factor without registers, size+antialias with them
            pos_rule="bicubic-aa" if reg else "dinov2-offset",
            hf_pos_rule="bicubic-aa" if reg else "bicubic",
            aliases=(arch_name + ("_reg" if reg else ""),),
            weight_format="dinov2-hub",
        )
    )


for _reg in (False, True):
    _dinov2(
        "s", 384, 12, 6, _reg,
        theta=2.0 if _reg else 3.0,
        note="" if _reg else "the paper saw no bimodality for ViT-S/14 without registers and did not apply ITAE; 3.0 is a placeholder",
    )
    _dinov2("b", 768, 12, 12, _reg, theta=3.0)
    _dinov2("l", 1024, 24, 16, _reg, theta=3.0)
    _dinov2("g", 1536, 40, 24, _reg, theta=3.0)


def _clip(name: str, patch: int, dim: int, depth: int, heads: int, proj: int, url_hash: str, file: str, hf: str, alias: str) -> None:
    register(
        ModelSpec(
            name=name,
            family="clip",
            arch=ArchConfig(
                patch_size=patch,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                mlp_hidden=dim * 4,
                pos_grid=224 // patch,
                act="quick_gelu",
                layerscale=False,
                pre_norm=True,
                patch_bias=False,
                proj_dim=proj,
                norm_eps=1e-5,
            ),
            theta=2.0,
            preprocessing=Preprocessing(CLIP_MEAN, CLIP_STD),
            url=f"{CLIP_URL}/{url_hash}/{file}",
            hf_hub_id=hf,
            pos_rule="bicubic-aa",  # open_clip's resize_pos_embed, used only away from 224
            hf_pos_rule="bicubic",
            aliases=(alias,),
            weight_format="openai-clip",
        )
    )


_clip("clip_vitb16", 16, 768, 12, 12, 512, "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
      "ViT-B-16.pt", "openai/clip-vit-base-patch16", "clip-b16")
_clip("clip_vitl14", 14, 1024, 24, 16, 768, "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
      "ViT-L-14.pt", "openai/clip-vit-large-patch14", "clip-l14")
_clip("clip_vitb32", 32, 768, 12, 12, 512, "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
      "ViT-B-32.pt", "openai/clip-vit-base-patch32", "clip-b32")


@dataclass(frozen=True)
class TextArchConfig:
    """CLIP's text tower (itae_export.model.text.TextTransformer): a causal pre-norm transformer
    pooled at the end-of-text token, then projected into the image embedding space."""

    width: int
    layers: int
    heads: int
    embed_dim: int  # the joint space; equals the image tower's proj_dim
    vocab_size: int = 49408
    context_length: int = 77
    act: str = "quick_gelu"
    norm_eps: float = 1e-5


# the text towers of the CLIP entries above (OpenAI's configs, as in open_clip's model_configs)
TEXT_ARCHS: dict[str, TextArchConfig] = {
    "clip_vitb16": TextArchConfig(width=512, layers=12, heads=8, embed_dim=512),
    "clip_vitb32": TextArchConfig(width=512, layers=12, heads=8, embed_dim=512),
    "clip_vitl14": TextArchConfig(width=768, layers=12, heads=12, embed_dim=768),
}


def get_text_arch(name: str) -> TextArchConfig:
    canonical = resolve_name(name)
    if canonical not in TEXT_ARCHS:
        raise OptionError(f"--model: {canonical} has no text tower (CLIP models: {', '.join(sorted(TEXT_ARCHS))})")
    return TEXT_ARCHS[canonical]


def _deit3(name: str, dim: int, depth: int, heads: int, theta: float, file: str, alias: str, timm_name: str) -> None:
    register(
        ModelSpec(
            name=name,
            family="deit3",
            arch=ArchConfig(
                patch_size=16,
                embed_dim=dim,
                depth=depth,
                num_heads=heads,
                mlp_hidden=dim * 4,
                pos_grid=14,
                pos_embed_cls=False,
            ),
            theta=theta,
            preprocessing=Preprocessing(IMAGENET_MEAN, IMAGENET_STD),
            url=f"{DEIT_URL}/{file}",
            hf_hub_id=f"timm/{timm_name}",
            pos_rule="bicubic-aa",  # timm's resample_abs_pos_embed
            aliases=(alias,),
            weight_format="deit-official",
        )
    )


_deit3("deit3_base16", 768, 12, 12, 2.7, "deit_3_base_224_21k.pth", "deit3-b16", "deit3_base_patch16_224.fb_in22k_ft_in1k")
_deit3("deit3_large16", 1024, 24, 16, 3.25, "deit_3_large_224_21k.pth", "deit3-l16", "deit3_large_patch16_224.fb_in22k_ft_in1k")


# itae-cluster without --model or --onnx: DINOv2 ViT-B/14, the paper's main model (Table 1, theta 3.0),
# a good trade of quality and speed (86 M parameters; ViT-S/14 without registers shows no artifacts)
DEFAULT_CLUSTER_MODEL = "dinov2_vitb14"


def list_models(include_aliases: bool = False) -> list[str]:
    """Canonical model names, sorted; with aliases too when asked (for click.Choice)."""
    names = sorted(_REGISTRY)
    if include_aliases:
        names += sorted(_ALIASES)
    return names


def resolve_name(name: str) -> str:
    """Canonical name of a model name or alias; case and '-' vs '_' do not matter."""
    plain = name.strip().lower()
    for key in (name, plain, plain.replace("-", "_")):
        if key in _REGISTRY:
            return key
        if key in _ALIASES:
            return _ALIASES[key]
    raise UnknownModelError(
        f"unknown model {name!r}; known models: {', '.join(list_models())} (aliases: {', '.join(sorted(_ALIASES))})"
    )


def get_model_spec(name: str) -> ModelSpec:
    return _REGISTRY[resolve_name(name)]


# ---------------------------------------------------------------- ITAE options

SOURCES = ("query", "key", "value", "output")
ROWS = ("cls", "all")
# The one table of the options that become integer attributes of the itae ops (docs/onnx-ops.md):
# the PyTorch ops (model/ops.py) and the ONNX functions (onnx/functions.py) read their codes here.
GROUP_CODES = {"minority": 0, "below": 1, "above": 2}
STRATEGY_CODES = {"min": 0, "neg-inf": 1, "mean": 2}
GROUPS = tuple(GROUP_CODES)
STRATEGIES = tuple(STRATEGY_CODES)


def parse_theta(value, *, allow_auto: bool = False) -> float | str | None:
    """The one check of theta: a finite number >= 0 (from a float or a string), ``None``, or, where
    allowed, ``"auto"``. Anything else is an InputError naming --theta."""
    if value is None or (allow_auto and value == "auto"):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise OptionError(f"--theta: {value!r} is not a number" + (" or 'auto'" if allow_auto else "")) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise OptionError(f"--theta: {value!r} must be a finite number >= 0")
    return float(value)


@dataclass(frozen=True)
class ITAEOptions:
    """Every option of the ITAE spec. ``enabled=False`` is the unpatched baseline."""

    theta: float = 3.0
    source: str = "query"
    group: str = "minority"
    strategy: str = "min"
    rows: str = "cls"
    lsa: bool = False
    enabled: bool = True

    def __post_init__(self) -> None:
        for opt, allowed in (("source", SOURCES), ("group", GROUPS), ("strategy", STRATEGIES), ("rows", ROWS)):
            if getattr(self, opt) not in allowed:
                raise OptionError(f"--{opt}: {getattr(self, opt)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.theta, str):  # only numbers here: "auto" is resolved before options exist
            raise OptionError(f"--theta: {self.theta!r} must be a finite number >= 0")
        object.__setattr__(self, "theta", parse_theta(self.theta))

    @classmethod
    def for_model(cls, spec: ModelSpec, **overrides) -> "ITAEOptions":
        """Defaults of the spec, with the model's theta, then any non-None overrides."""
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        kwargs.setdefault("theta", spec.theta)
        return cls(**kwargs)

    # integer codes used by the custom ONNX ops (docs/onnx-ops.md)
    @property
    def group_code(self) -> int:
        return GROUP_CODES[self.group]

    @property
    def strategy_code(self) -> int:
        return STRATEGY_CODES[self.strategy]

    def slug(self) -> str:
        """A short file-name-safe description, used for default output paths."""
        if not self.enabled:
            return "noitae"
        parts = [f"t{self.theta:g}".replace(".", "p")]
        defaults = ITAEOptions()
        for opt in ("source", "group", "strategy", "rows"):
            if getattr(self, opt) != getattr(defaults, opt):
                parts.append(getattr(self, opt).replace("-", ""))
        if self.lsa:
            parts.append("lsa")
        return "itae-" + "-".join(parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
