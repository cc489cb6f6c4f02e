"""The scores and the models that make them: CLIP-T, CLIP-I and face similarity, each 100 x a cosine.

Conventions (docs/evaluation.md has the long form), as the papers print them:

* CLIP-T: scoring-CLIP image embedding of the output vs the text embedding of its prompt ({class} filled in).
* CLIP-I: scoring-CLIP image embedding of the output vs that of the whole reference photo.
* Face Sim.: ArcFace cosine of the largest usable face in the output to the reference's largest face, through the
  pipeline's own face analyzer. An output with no usable face gets no score (None, not a zero).
* FaceNet: the same with facenet-pytorch's InceptionResnetV1 (VGGFace2), when that package and its weights are here.

The scoring CLIP is separate from the pipeline's encoders (default ``openai/clip-vit-large-patch14``), so the metric
does not grade the model with its own features. ``tiny_clip_scorer`` is a tiny random CLIP built offline: its numbers
check the plumbing and mean nothing about images. Nothing here knows about runs or files: any command can score.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

SCALE = 100.0  # similarities are reported as 100 x cosine
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


# --- small pure functions -----------------------------------------------------------------------------------------


def _unit_rows(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    array = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)
    array = np.atleast_2d(array).astype(np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=-1, keepdims=True), 1e-12)


def cosine_scores(a, b) -> np.ndarray:
    """Row-wise ``SCALE`` x cosine of ``[N, D]`` and ``[N, D]`` (or ``[1, D]``, compared with every row)."""
    a, b = _unit_rows(a), _unit_rows(b)
    if a.shape[-1] != b.shape[-1] or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"Cannot compare embeddings of shapes {a.shape} and {b.shape}.")
    return SCALE * np.sum(a * b, axis=-1)


def clip_text_score(image_embeds, text_embeds) -> np.ndarray:
    """CLIP-T per image: its CLIP image embedding against its prompt's CLIP text embedding."""
    return cosine_scores(image_embeds, text_embeds)


def clip_image_score(image_embeds, reference_embeds) -> np.ndarray:
    """CLIP-I per image: its CLIP image embedding against the reference photo's."""
    return cosine_scores(image_embeds, reference_embeds)


def face_score(embedding, reference) -> float | None:
    """Face similarity of one output: None when the output has no face (no embedding) to compare."""
    if embedding is None or reference is None:
        return None
    return float(cosine_scores(embedding, reference)[0])


def largest_face(analyzer, image: Image.Image):
    """The largest usable face in ``image``, or None: for a generated image no face is a result, not an error."""
    from ..faces.analyzer import FaceError
    from ..images import InvalidImageError

    try:
        faces = analyzer.analyze(image)
    except (FaceError, InvalidImageError):
        return None
    return faces[0] if faces else None


# --- the scoring models -------------------------------------------------------------------------------------------


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x returned the tensor.
    return output if torch.is_tensor(output) else output.pooler_output


class ClipScorer:
    """A CLIP model used only for the metrics. Embeddings come back L2-normalised, float32, on the CPU."""

    def __init__(self, model, processor, name: str = "", batch_size: int = 16):
        self.model = model.eval()
        self.processor = processor
        self.name = name or str(getattr(model.config, "_name_or_path", "") or "clip")
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = DEFAULT_CLIP_MODEL, local_files_only: bool | None = None
    ) -> ClipScorer:
        """Load a transformers CLIP (hub id or local folder) on the CPU; ``to()`` moves it. Offline and missing
        raises ``MissingWeightsError`` saying how to fetch it."""
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

        from ..models.fetching import offline_requested
        from ..models.hub import MissingWeightsError

        offline = offline_requested(local_files_only)
        try:
            model = CLIPModel.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=offline)
            # The PIL image processor: the default one wants torchvision, which this project does not install.
            processor = CLIPProcessor(
                image_processor=CLIPImageProcessorPil.from_pretrained(name_or_path, local_files_only=offline),
                tokenizer=CLIPTokenizer.from_pretrained(name_or_path, local_files_only=offline),
            )
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MissingWeightsError(
                f"The scoring CLIP model '{name_or_path}' could not be loaded ({reason}). It is not among the files "
                f"`python -m infinite_id download` fetches: get it once with `hf download {name_or_path}`, or pass "
                "--clip-model a local folder holding a transformers CLIP model."
            ) from None
        return cls(model, processor, name=str(name_or_path))

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> ClipScorer:
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(self._device, self.model.dtype)
            chunks.append(_projected(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        # CLIP reads 77 tokens; a longer prompt is scored on its first 77, as every CLIP-T implementation does.
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=77)
        output = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self._device), attention_mask=tokens.attention_mask.to(self._device)
        )
        return torch.nn.functional.normalize(_projected(output).float().cpu(), dim=-1)


def tiny_clip_scorer(seed: int = 0) -> ClipScorer:
    """A tiny random ``CLIPModel`` on the repo's tiny tokenizer, built offline in well under a second.

    Its scores obey the conventions (identical images give 100) but say nothing about the images: engine checks only.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from ..testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's random stream
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer
    )
    return ClipScorer(model, processor, name="tiny random CLIP (engine check)")


class FaceNetEmbedder:
    """FaceNet (facenet-pytorch ``InceptionResnetV1``) on the face analyzer's aligned crop, resized to 160 px.

    The analyzer's ArcFace alignment stands in for FaceNet's own MTCNN crop, so both face metrics see the same face.
    """

    def __init__(self, model: torch.nn.Module, size: int = 160):
        self.model = model.eval()
        self.size = size

    @classmethod
    def load(cls) -> FaceNetEmbedder | None:
        """FaceNet with VGGFace2 weights, or None when facenet-pytorch or its weights are not available."""
        try:
            from facenet_pytorch import InceptionResnetV1
        except ImportError:
            return None
        try:
            model = InceptionResnetV1(pretrained="vggface2")
        except Exception as error:  # its weights come from a GitHub release on first use: offline they may be missing
            logger.warning("facenet-pytorch is installed but its weights could not be loaded (%s); no FaceNet.", error)
            return None
        return cls(model)

    @torch.inference_mode()
    def embed(self, face) -> np.ndarray:
        crop = face.arcface_crop.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)[None]
        pixels = (pixels - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
        parameter = next(self.model.parameters())
        return self.model(pixels.to(parameter.device, parameter.dtype))[0].float().cpu().numpy()
