"""Which modules of each VLM architecture are its vision tower, projector and language model.

One table from transformers' ``model_type`` to an :class:`ArchitectureLayout`, in the
spirit of Liger-Kernel's ``model_type`` registry: supporting a new architecture is a
new row, never a new branch. A pattern is a dotted run of module names matched at
component boundaries anywhere in a parameter name, so one row serves the plain model
(``model.visual.merger.mlp.0.weight``), older transformers layouts without the
``model.`` prefix (``visual.merger...``) and PEFT-wrapped models
(``base_model.model.model.visual.merger...``) alike. The longest matching pattern
wins, which is how a projector nested inside a vision module (Qwen2-VL's
``visual.merger``) is told apart from the module around it; between equally long
patterns the outermost module decides, so a nested exception is always written out
as the longer pattern.

``other`` is reserved for parts that are genuinely none of the three: audio
towers, a robot policy's action expert, a protein encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureLayout:
    vision: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    other: tuple[str, ...] = ()
    vision_stacks: tuple[str, ...] = ()
    """The numbered vision block stacks, in forward order, where finding them by name would pick others."""

    def patterns(self) -> list[tuple[tuple[str, ...], str]]:
        """Every pattern as ``(components, group)``."""
        return [
            (tuple(pattern.split(".")), group)
            for group in ("vision", "projector", "language", "other")
            for pattern in getattr(self, group)
        ]


PI0 = ArchitectureLayout(
    vision=("vision_tower",),
    projector=("multi_modal_projector",),
    language=("language_model",),
    other=("dit", "action_out_proj", "embed_action_time"),  # the action expert of a robot policy
)

# A language model as the top-level ``model`` of a bare causal LM (Idefics, Chameleon, Evolla).
_BARE_DECODER = ("model.layers", "model.embed_tokens", "model.norm", "lm_head")

LLAVA = ArchitectureLayout(
    vision=("vision_tower",),
    # image_newline is a learned row appended to the projected image features: it only
    # ever meets image features, so it trains (or stays frozen) with the projector.
    projector=("multi_modal_projector", "image_newline"),
    language=("language_model", "lm_head"),
)
VISION_MODEL_LLAVA = ArchitectureLayout(
    vision=("vision_model",), projector=("multi_modal_projector",), language=("language_model", "lm_head")
)
QWEN2_VL = ArchitectureLayout(vision=("visual",), projector=("visual.merger",), language=("language_model", "lm_head"))
QWEN3_VL = ArchitectureLayout(
    vision=("visual",),
    projector=("visual.merger", "visual.deepstack_merger_list"),
    language=("language_model", "lm_head"),
)
IDEFICS3 = ArchitectureLayout(vision=("vision_model",), projector=("connector",), language=("text_model", "lm_head"))
BLIP2 = ArchitectureLayout(
    vision=("vision_model",),
    projector=("qformer", "query_tokens", "language_projection"),
    language=("language_model",),
)
GEMMA_N = ArchitectureLayout(
    vision=("vision_tower",),
    projector=("embed_vision",),
    language=("language_model", "lm_head"),
    other=("audio_tower", "embed_audio"),
)
MINICPM_V = ArchitectureLayout(vision=("vision_tower",), projector=("merger",), language=("language_model", "lm_head"))
KOSMOS2 = ArchitectureLayout(
    vision=("vision_model",), projector=("image_to_text_projection",), language=("text_model",)
)
MUSE = ArchitectureLayout(
    vision=("vision_tower",),
    projector=("vision_adapter", "vision_projection"),
    language=("language_model", "lm_head"),
    other=("audio_tower",),
)

LAYOUTS: Mapping[str, ArchitectureLayout] = {
    # LLaVA family and models built the same way: vision_tower -> multi_modal_projector -> language_model
    "llava": LLAVA,
    "llava_next": LLAVA,
    "llava_next_video": LLAVA,
    "llava_onevision": LLAVA,
    "vipllava": LLAVA,
    "aya_vision": LLAVA,
    "cohere2_vision": LLAVA,
    "fast_vlm": LLAVA,
    "got_ocr2": LLAVA,
    "pp_chart2table": LLAVA,
    "perception_lm": LLAVA,
    "molmo2": LLAVA,
    "qianfan_ocr": LLAVA,
    "minimax_m3_vl": LLAVA,
    "lfm2_vl": LLAVA,
    "lfm3_vl": LLAVA,
    "internvl": LLAVA,
    "mistral3": LLAVA,  # Pixtral vision encoder; the patch merger sits in the projector
    "mistral_large4": LLAVA,
    "paligemma": LLAVA,
    "gemma3": LLAVA,
    "shieldgemma2": LLAVA,
    "aria": LLAVA,
    "florence2": LLAVA,
    "unlimited_ocr": ArchitectureLayout(
        vision=("vision_tower",),
        projector=("multi_modal_projector", "image_newline", "view_separator"),
        language=("language_model", "lm_head"),
    ),
    "video_llava": ArchitectureLayout(
        vision=("image_tower", "video_tower"),
        projector=("multi_modal_projector",),
        language=("language_model", "lm_head"),
    ),
    # vision_model -> multi_modal_projector -> language_model
    "mllama": VISION_MODEL_LLAVA,  # the language model's cross-attention layers are language
    "llama4": VISION_MODEL_LLAVA,  # its vision_adapter (pixel shuffle MLP) belongs to the vision model
    "nemotron_h_omni": VISION_MODEL_LLAVA,
    "step3p7": VISION_MODEL_LLAVA,
    # Qwen-VL family: the merger (projector) lives inside the vision module
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_VL,
    "qwen3_5": QWEN2_VL,
    "qwen3_5_moe": QWEN2_VL,
    "exaone4_5": QWEN2_VL,
    "glm4v": QWEN2_VL,
    "glm4v_moe": QWEN2_VL,
    "glm46v": QWEN2_VL,
    "glmga": QWEN2_VL,
    "glm5_next": QWEN2_VL,
    "glm_ocr": QWEN2_VL,
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL,
    "cosmos3_omni": QWEN3_VL,
    # Before transformers 5.19 the omni thinkers kept their decoder as a bare "model".
    "qwen2_5_omni_thinker": ArchitectureLayout(
        vision=("visual",),
        projector=("visual.merger",),
        language=("language_model", *_BARE_DECODER),
        other=("audio_tower",),
    ),
    "qwen3_omni_moe_thinker": ArchitectureLayout(
        vision=("visual",),
        projector=("visual.merger", "visual.merger_list"),
        language=("language_model", *_BARE_DECODER),
        other=("audio_tower",),
    ),
    "cosmos3_edge": ArchitectureLayout(
        vision=("visual",), projector=("projector",), language=("language_model", "lm_head")
    ),
    "paddleocr_vl": ArchitectureLayout(
        vision=("visual",), projector=("projector",), language=("language_model", "lm_head")
    ),
    "hyperclovax_vision_v2": ArchitectureLayout(
        vision=("vision_model",), projector=("vision_model.merger", "projector"), language=("language_model", "lm_head")
    ),
    "dots3_note": ArchitectureLayout(
        vision=("vision_tower",),
        projector=("vision_tower.merger",),
        language=("language_model", "lm_head"),
        other=("audio_tower",),
    ),
    "inkling2": ArchitectureLayout(
        vision=("vision_tower",), projector=("vision_tower.merger",), language=("language_model", "lm_head")
    ),
    "inkling_mm_model": ArchitectureLayout(
        vision=("vision_tower",), language=("language_model", "lm_head"), other=("audio_tower",)
    ),
    # Idefics family: vision_model -> connector -> text_model
    "idefics2": IDEFICS3,
    "idefics3": IDEFICS3,
    "smolvlm": IDEFICS3,
    "granite_docling": ArchitectureLayout(
        vision=("vision_model",), projector=("vision_model.connector",), language=("text_model", "lm_head")
    ),
    "idefics": ArchitectureLayout(
        vision=("vision_model",),
        # Flamingo-style: the gated cross-attention layers and the resampler are the image-to-text bridge.
        projector=("gated_cross_attn_layers", "perceiver_resampler"),
        language=_BARE_DECODER,
    ),
    "gemma3n": GEMMA_N,
    "gemma4": GEMMA_N,
    "gemma4_unified": GEMMA_N,
    "minicpm_ocr": MINICPM_V,
    "minicpmv4_6": MINICPM_V,
    "minicpmv4_7": MINICPM_V,
    "kimi_k25": ArchitectureLayout(
        vision=("vision_tower",), projector=("mm_projector",), language=("language_model", "lm_head")
    ),
    "ernie4_5_vl_moe": ArchitectureLayout(
        vision=("vision_tower",), projector=("resampler_model",), language=("language_model", "lm_head")
    ),
    "lighton_ocr": ArchitectureLayout(
        vision=("vision_encoder",), projector=("vision_projection",), language=("language_model", "lm_head")
    ),
    "ovis2": ArchitectureLayout(
        vision=("vision_tower",), projector=("visual_embeddings_table",), language=("language_model", "lm_head")
    ),
    "video_llama_3": ArchitectureLayout(
        vision=("vision_model",), projector=("projector",), language=("language_model", "lm_head")
    ),
    "deepseek_vl": ArchitectureLayout(
        vision=("vision_model",), projector=("aligner",), language=("language_model", "lm_head")
    ),
    "deepseek_vl_hybrid": ArchitectureLayout(
        vision=(
            "vision_model",
            "high_res_vision_model",
            "high_res_vision_neck",
            "high_res_vision_proj",
            "high_res_vision_alpha",
        ),
        projector=("aligner",),
        language=("language_model", "lm_head"),
    ),
    "janus": ArchitectureLayout(
        # The image-generation path (VQ tokenizer, its aligner, embeddings and head) is unused by
        # text DPO; it is grouped with the parts it mirrors so that the default keeps it frozen.
        vision=("vision_model", "vqmodel"),
        projector=("aligner", "generation_aligner", "generation_embeddings", "generation_head"),
        language=("language_model", "lm_head"),
        vision_stacks=("vision_model.encoder.layers",),  # not the VQ decoder's upsampling blocks
    ),
    "fuyu": ArchitectureLayout(
        # Fuyu has no vision encoder: one linear layer maps raw patches into the decoder.
        projector=("vision_embed_tokens",),
        language=("language_model", "lm_head"),
    ),
    "muse_glimmer": MUSE,
    "muse_spark": MUSE,
    "blip": ArchitectureLayout(vision=("vision_model",), language=("text_decoder",)),
    "blip-2": BLIP2,
    "instructblip": BLIP2,
    "instructblipvideo": BLIP2,
    "kosmos-2": KOSMOS2,
    "kosmos-2.5": KOSMOS2,
    "git": ArchitectureLayout(
        vision=("image_encoder",),
        projector=("visual_projection",),
        language=("git.embeddings", "git.encoder", "output"),
    ),
    "chameleon": ArchitectureLayout(vision=("vqmodel",), language=_BARE_DECODER),
    "emu3": ArchitectureLayout(vision=("vqmodel",), language=("text_model", "lm_head")),
    # Discrete image and audio tokenizers (VQ encoders) feed the language model ids, like Emu3's vqmodel.
    "apertus1p5": ArchitectureLayout(
        vision=("vision_tokenizer",), language=("language_model", "lm_head"), other=("audio_tokenizer",)
    ),
    "evolla": ArchitectureLayout(language=_BARE_DECODER, other=("protein_encoder",)),
    "pi0": PI0,
    "pi05": PI0,  # pi0.5: the same layout, its action expert conditioned on time by adaptive norms
    "pix2struct": ArchitectureLayout(vision=("encoder",), language=("decoder",)),
    "pp_formulanet": ArchitectureLayout(
        vision=("encoder",), projector=("encoder.multi_modal_projector",), language=("decoder", "lm_head")
    ),
    "t5gemma2": ArchitectureLayout(
        vision=("vision_tower",), projector=("multi_modal_projector",), language=("text_model", "decoder", "lm_head")
    ),
    "udop": ArchitectureLayout(
        vision=("patch_embed", "encoder.embed_patches", "decoder.embed_patches"),
        language=("encoder", "decoder", "shared", "lm_head"),
    ),
    "vision-encoder-decoder": ArchitectureLayout(
        vision=("encoder",), projector=("enc_to_dec_proj",), language=("decoder",)
    ),
    # Remote-code models (trust_remote_code) that preference-training recipes commonly use.
    "internvl_chat": ArchitectureLayout(vision=("vision_model",), projector=("mlp1",), language=("language_model",)),
    "minicpmv": ArchitectureLayout(vision=("vpm",), projector=("resampler",), language=("llm",)),
}

# The generic fallback for model types without a row: single module names, tried in
# this order (a projector nested in a vision module must win over the vision marker).
GENERIC_MARKERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("other", frozenset({"audio_tower", "audio_model", "audio_encoder", "embed_audio", "speech_encoder"})),
    (
        "projector",
        frozenset(
            {
                "multi_modal_projector",
                "mm_projector",
                "merger",
                "connector",
                "aligner",
                "projector",
                "visual_projection",
                "vision_projection",
                "language_projection",
                "image_to_text_projection",
                "resampler",
                "qformer",
                "query_tokens",
                "image_newline",
                "embed_vision",
            }
        ),
    ),
    (
        "vision",
        frozenset(
            {
                "vision_tower",
                "visual",
                "vision_model",
                "vision_encoder",
                "image_encoder",
                "image_tower",
                "video_tower",
                "vision_embed_tokens",
                "vpm",
                "vqmodel",
            }
        ),
    ),
    ("language", frozenset({"language_model", "lm_head", "embed_tokens", "text_model", "llm", "text_decoder"})),
)

# A bare causal LM nests its decoder as ``model.layers.N`` / ``model.norm``.
BARE_DECODER_PARTS = frozenset({"layers", "norm", "embed_tokens", "rotary_emb", "final_layernorm"})
