"""Every knob of the miniature world, as frozen dataclasses (the ``world`` params section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from components.world.render import SceneSpace


@dataclass(frozen=True)
class DataConfig:
    """What is rendered: image size, split sizes, the attribute space and the caption hold-out."""

    image_size: int = 32
    n_train: int = 20000
    n_reference: int = 512
    n_eval: int = 256
    holdout: float = 0.1  # fraction of the caption space kept out of training for `eval`
    space: SceneSpace = field(default_factory=SceneSpace)

    def validate(self) -> None:
        self.space.validate()
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError("image_size must be a multiple of 8, at least 16")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError("holdout must be in [0, 1)")
        if min(self.n_train, self.n_reference, self.n_eval) < 1:
            raise ValueError("every split needs at least one image")


@dataclass(frozen=True)
class VaeConfig:
    """AutoencoderKL: one downsampling per channel entry after the first (3 entries: factor 4)."""

    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    steps: int = 300
    max_seconds: float = 0.0  # 0: no time cap; a cap that triggers breaks determinism
    batch: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6


@dataclass(frozen=True)
class TextConfig:
    """CLIPTextModel, trained jointly with the UNet through the diffusion loss."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    max_length: int = 77  # context length (tokens, BOS and EOS included); SD uses 77


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel (epsilon prediction) and its training."""

    channels: tuple[int, ...] = (64, 128)
    attention: tuple[bool, ...] = (False, True)  # cross-attention per resolution, high to low
    layers_per_block: int = 1
    head_dim: int = 8
    steps: int = 900
    max_seconds: float = 0.0
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 50
    ema: float = 0.0  # 0: no EMA; otherwise the decay of an EMA copy that is saved instead
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0  # Min-SNR-gamma loss weight (arXiv 2303.09556); 0 disables it

    def validate(self) -> None:
        if len(self.attention) != len(self.channels):
            raise ValueError("attention needs one flag per entry of channels")


@dataclass(frozen=True)
class SD3Config:
    """The flow teacher (``world.teacher: sd3``): an ``SD3Transformer2DModel`` (MMDiT) trained with
    flow matching on the world's latents, with SD3's three text encoders at world size (two
    CLIPTextModelWithProjection, one T5 encoder on an offline-trained T5 vocabulary), trained
    jointly with it; saved as a ``StableDiffusion3Pipeline``."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 1
    qk_norm: bool = True  # SD3.5's RMS norm of queries and keys
    text_hidden: int = 64  # width of each CLIP encoder (and of the T5 encoder)
    text_layers: int = 2
    max_length: int = 16  # CLIP tokens per prompt (captions need 15 with BOS and EOS)
    t5_length: int = 64  # T5 tokens per prompt (its small vocabulary splits words finely)
    shift: float = 3.0  # the scheduler's timestep shift (SD3's static shift); training draws
    # sigma = shift(u) with u logit-normal(0, 1) (SD3's "lognorm" sampling)
    steps: int = 1500
    max_seconds: float = 0.0
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 100
    caption_dropout: float = 0.1

    def validate(self) -> None:
        for key in ("layers", "heads", "head_dim", "patch_size", "text_hidden", "text_layers",
                    "max_length", "t5_length", "steps", "batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"world.sd3.{key} must be at least 1, got {getattr(self, key)}")
        if self.shift <= 0:
            raise ValueError(f"world.sd3.shift must be positive, got {self.shift}")


TEACHERS = ("unet", "sd3")


@dataclass(frozen=True)
class CheckConfig:
    """The prompt-following check at the end of a build: samples of held-out eval captions."""

    n_samples: int = 256
    steps: int = 25
    guidance_scale: float = 4.0


@dataclass(frozen=True)
class WorldConfig:
    """The ``world`` section: seed, data, VAE, which teacher family (``teacher``: ``unet``, a
    UNet with the ``text`` encoder; ``sd3``, the flow transformer of ``sd3``) and the final
    check."""

    seed: int = 0
    teacher: str = "unet"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    sd3: SD3Config = field(default_factory=SD3Config)
    check: CheckConfig = field(default_factory=CheckConfig)

    def validate(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"world.teacher must be one of {', '.join(TEACHERS)}, got "
                             f"{self.teacher!r}")
        self.data.validate()
        self.unet.validate()
        self.sd3.validate()
        factor = 2 ** (len(self.vae.channels) - 1)
        if self.data.image_size % (factor * 2 ** (len(self.unet.channels) - 1)):
            raise ValueError("image_size must be divisible by the VAE and UNet downsampling")
