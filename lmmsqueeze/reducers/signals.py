"""The signals the runtime measures for reducers: their names, shapes and the :class:`Signals`
holder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

#: Signals the runtime knows how to provide. A reducer lists the ones it reads in ``needs``;
#: each arrives aligned with the slots of the state it is given. ``T`` counts the prompt tokens after
#: the sample's last image token ("the text after the image").
SIGNALS = {
    "text_attention": "[N] head-mean attention of the last prompt token to each image token at decoder "
    "layer K-1 (llm placement)",
    "text_image_attention": "[T, N] head-mean attention of each prompt token after the image to each image "
    "token at decoder layer K-1 (llm placement)",
    "input_text_attention": "[N] head-mean attention of the last prompt token to each image token, "
    "recomputed from the input of decoder layer K with layer K's own input norm, q/k projections and RoPE "
    "(llm placement)",
    "llm_keys": "[N, d_kv] keys of the image tokens at decoder layer K-1 after RoPE, as its KV cache holds "
    "them (llm placement)",
    "text_keys": "[T, d_kv] keys of the prompt tokens after the image at decoder layer K-1 after RoPE "
    "(llm placement)",
    "normed_hidden": "[N, D] the image tokens entering layer K through the decoder's final norm "
    "(llm placement)",
    "text_normed_hidden": "[T, D] the prompt tokens after the image entering layer K through the decoder's "
    "final norm (llm placement)",
    "sequence_index": "[N] column of each image token in its sample's sequence at layer K, padding not "
    "counted (llm placement)",
    "text_sequence_index": "[T] the same for the prompt tokens after the image (llm placement)",
    "text_relevance": "[T] for each prompt token after the image, the mean over the image tokens entering "
    "the LLM of the softmax over those prompt tokens of (image embedding . text embedding), at the decoder "
    "input (llm placement)",
    "cls_attention": "[N] head-mean attention of the vision tower's [CLS] token to each patch at the vision "
    "feature layer (any placement)",
    "vision_keys": "[N, d_head] key projections of each patch at the vision feature layer, averaged over "
    "heads (any placement)",
    "cls_hidden": "[crops, d_vision] the [CLS] token's feature at the vision feature layer, per crop the "
    "tower encodes (vision placement; towers with a [CLS] token)",
    "last_cls_attention": "[N] attention of the [CLS] token to each patch in the vision tower's last layer "
    "(CLIP-L's layer 23, after LLaVA-1.5's feature layer), its q and k projections taken as one full-width "
    "head: softmax of q.k / sqrt(d_vision) (any placement)",
    "last_vision_keys": "[N, d_vision] full-width key projections of each patch in the vision tower's last "
    "layer (any placement)",
}
LLM_SIGNALS = frozenset({"text_attention", "text_image_attention", "input_text_attention", "llm_keys",
                         "text_keys", "normed_hidden", "text_normed_hidden", "sequence_index",
                         "text_sequence_index", "text_relevance"})
VISION_SIGNALS = frozenset({"cls_attention", "vision_keys", "cls_hidden", "last_cls_attention",
                            "last_vision_keys"})
#: signals that describe the text after the image or a whole image, not one row per image token
UNALIGNED_SIGNALS = frozenset({"text_image_attention", "text_keys", "text_normed_hidden",
                               "text_sequence_index", "text_relevance", "cls_hidden"})
POSITION_POLICIES = ("keep", "renumber")


@dataclass
class Signals:
    """What the runtime measured for the tokens of one state, aligned with its slots.

    Only the signals a reducer lists in ``needs`` (and the ``optional`` ones the model provides) are
    filled in (see :data:`SIGNALS`); reading another raises.
    """

    text_attention: Tensor | None = None
    text_image_attention: Tensor | None = None
    input_text_attention: Tensor | None = None
    llm_keys: Tensor | None = None
    text_keys: Tensor | None = None
    normed_hidden: Tensor | None = None
    text_normed_hidden: Tensor | None = None
    sequence_index: Tensor | None = None
    text_sequence_index: Tensor | None = None
    text_relevance: Tensor | None = None
    cls_attention: Tensor | None = None
    vision_keys: Tensor | None = None
    cls_hidden: Tensor | None = None
    last_cls_attention: Tensor | None = None
    last_vision_keys: Tensor | None = None

    def require(self, name: str) -> Tensor:
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"signal {name!r} was not provided: add it to the reducer's `needs`")
        return value
