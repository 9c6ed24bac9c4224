"""An independent transformers reference for the engine tests (no vLLM, no plugin code).

Scores come from transformers' own eager attention probabilities (``output_attentions``), KV from
its own cache; only ``lookm_vllm.core.compress`` (tested separately against a slow reference) is
shared with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HFPrefill:
    input_ids: torch.Tensor        # [P]
    keys: list[torch.Tensor]       # per layer [Hkv, P, d] (post-RoPE, as cached)
    values: list[torch.Tensor]
    scores: list[torch.Tensor]     # per layer float32 [Hkv, P]: attention summed over queries
    first_token: int
    model: object
    rope_deltas: torch.Tensor | None = None


def load(path: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    return model, AutoProcessor.from_pretrained(path)


@torch.inference_mode()
def prefill(path: str, prompt: str, images, videos=None) -> HFPrefill:
    model, processor = load(path)
    media = {"images": images or None}
    if videos:  # all frames, at the frame rate the engine was told (video M-RoPE follows time)
        from lookm_vllm.demo.videos import video_metadata

        fields = ("fps", "duration", "total_num_frames", "frames_indices", "video_backend")
        media |= {"videos": videos, "do_sample_frames": False,
                  "video_metadata": [{k: video_metadata(v)[k] for k in fields} for v in videos]}
    inputs = processor(text=prompt, **media, return_tensors="pt")
    out = model(**inputs, use_cache=True, output_attentions=True)
    cache = out.past_key_values
    num_kv = cache.layers[0].keys.shape[1]
    scores = []
    for attn in out.attentions:                      # [1, Hq, P, P], rows are softmax(q.k)
        per_q_head = attn[0].sum(dim=1)              # [Hq, P]
        scores.append(per_q_head.view(num_kv, -1, per_q_head.shape[-1]).sum(dim=1).float())
    return HFPrefill(
        input_ids=inputs["input_ids"][0],
        keys=[layer.keys[0] for layer in cache.layers],
        values=[layer.values[0] for layer in cache.layers],
        scores=scores,
        first_token=int(out.logits[0, -1].argmax()),
        model=model,
        rope_deltas=getattr(getattr(model, "model", None), "rope_deltas", None),
    )


@torch.inference_mode()
def decode_from(ref: HFPrefill, keys: list[torch.Tensor], values: list[torch.Tensor],
                steps: int, first_token: int | None = None, store=None) -> list[int]:
    """Greedy tokens decoded from a (compressed) cache with LOGICAL positions.

    The first token is the prefill's (or ``first_token``); then each new token sits at logical
    position P + t although the cache holds only K + t entries. ``store(layer, keys, values)``,
    when given, is what a quantized cache does to each new token's K/V before attention reads
    it (vLLM writes the new entries to its cache first).
    """
    from transformers import DynamicCache

    class StoringCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if store is not None and self.decoding:
                key_states, value_states = store(layer_idx, key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    cache = StoringCache()
    cache.decoding = False
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k[None].clone(), v[None].clone(), layer)
    cache.decoding = True
    prompt_len = ref.input_ids.shape[0]
    kept = keys[0].shape[1]
    tokens = [ref.first_token if first_token is None else first_token]
    for t in range(steps - 1):
        position = prompt_len + t
        if ref.rope_deltas is not None:        # M-RoPE: text positions continue after the images
            pos = torch.full((3, 1, 1), position, dtype=torch.long) + ref.rope_deltas.view(1, 1, 1)
        else:
            pos = torch.tensor([[position]])
        out = ref.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=pos, cache_position=torch.tensor([kept + t]),
                        use_cache=True)
        cache = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens
